import json
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest

from mtnlg.cli import main
from mtnlg.curate import pii, pipeline
from mtnlg.curate.decontaminate import Contamination, Rules, task_items
from mtnlg.curate.minhash import MinHash, jaccard, shingles
from mtnlg.curate.pipeline import Options, curate
from mtnlg.curate.planted import planted_corpus
from mtnlg.curate.quality import Thresholds, failed_check
from mtnlg.errors import MtnlgError
from conftest import synthetic_documents


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def kept_lines(out: Path) -> list[int]:
    """Input line numbers of the documents kept (ids are file:line)."""
    return [int(json.loads(line)["id"].rsplit(":", 1)[1]) for line in (out / "documents.jsonl").read_text().splitlines()]


def test_exact_duplicates_differ_only_in_case_spacing_and_punctuation(tmp_path):
    texts = ["The cat sat on the mat.", "the  cat sat on the mat", "THE CAT, SAT ON THE MAT!", "A different text."]
    report = curate(Options([write_jsonl(tmp_path / "a.jsonl", texts)], tmp_path / "out", stages=("exact",), progress=False))
    assert kept_lines(tmp_path / "out") == [1, 4]
    exact = report["stages"][1]
    assert exact["documents_in"] == 4 and exact["documents_out"] == 2
    assert exact["removed"][f"{tmp_path / 'a.jsonl'}:2"] == f"exact duplicate of {tmp_path / 'a.jsonl'}:1"


def test_the_input_lines_other_fields_come_through(tmp_path):
    source = tmp_path / "a.jsonl"
    source.write_text(json.dumps({"content": "Some text.", "url": "https://example.org/1", "meta": {"year": 2020}}) + "\n")
    curate(Options([source], tmp_path / "out", stages=("exact",), json_key="content", progress=False))
    [record] = [json.loads(line) for line in (tmp_path / "out/documents.jsonl").read_text().splitlines()]
    assert record == {"text": "Some text.", "id": f"{source}:1", "source": str(source),
                      "fields": {"url": "https://example.org/1", "meta": {"year": 2020}}}


def test_minhash_estimates_jaccard_and_the_s_curve():
    words = synthetic_documents(1, seed=3)[0].split() * 3
    edited = list(words)
    for i in range(0, len(edited), 12):
        edited[i] = "changed"
    a, b = " ".join(words), " ".join(edited)
    params = MinHash(bands=64, rows=8)
    estimate = (params.signature(a) == params.signature(b)).mean()
    assert abs(estimate - jaccard(shingles(a, 5), shingles(b, 5))) < 0.1
    default = MinHash()
    assert default.permutations == 112 and abs(default.threshold() - 0.719) < 1e-3
    assert default.candidate_probability(0.85) > 0.98 and default.candidate_probability(0.5) < 0.06
    other_process = subprocess.run([sys.executable, "-c", "import sys; from mtnlg.curate.minhash import MinHash; "
                                    "print(MinHash().signature(sys.argv[1]).tolist())", a],
                                   capture_output=True, text=True, check=True).stdout
    assert json.loads(other_process) == default.signature(a).tolist()  # a fixed seed: runs repeat, across processes
    assert MinHash(bands=300, rows=1).band_keys(default.signature(a)[:1].repeat(300))  # more than 255 bands


def test_fuzzy_dedup_finds_planted_near_duplicates(tmp_path):
    """The issue's criterion on a smaller corpus: at threshold 0.8, at least 95% of the pairs above 0.85 found,
    fewer than 2% of the documents with no partner at 0.7 removed (benchmarks/curate_throughput.py: 20k)."""
    planted = planted_corpus(600, seed=1)
    source = write_jsonl(tmp_path / "in.jsonl", planted.texts)
    report = curate(Options([source], tmp_path / "out", stages=("fuzzy",), progress=False))
    scores = planted.scores({line - 1 for line in kept_lines(tmp_path / "out")})
    assert scores["pairs_above_0.85"] > 20 and scores["documents_below_0.7"] > 300
    assert scores["recall"] >= 0.95 and scores["false_removals"] < 0.02
    fuzzy = report["stages"][1]
    assert fuzzy["lsh"]["threshold_implied"] == 0.719 and fuzzy["clusters"] > 10
    assert all("near duplicate of" in reason and "Jaccard" in reason for reason in fuzzy["removed"].values())


def test_a_new_batch_is_deduplicated_against_an_earlier_corpus(tmp_path, monkeypatch):
    planted = planted_corpus(200, seed=4)
    first, second = planted.texts[:100], planted.texts[100:]
    curate(Options([write_jsonl(tmp_path / "a.jsonl", first)], tmp_path / "a", stages=("fuzzy",), progress=False))
    kept_before = kept_lines(tmp_path / "a")
    copies = [first[i - 1] + " One more sentence at the end." for i in kept_before[:5]]
    batch = write_jsonl(tmp_path / "b.jsonl", copies + second)
    signed = []
    monkeypatch.setattr(pipeline, "_signature", lambda record, params: signed.append(1) or params.signature(record["text"]))
    report = curate(Options([batch], tmp_path / "b", stages=("fuzzy",), against=[tmp_path / "a"], progress=False))
    assert len(signed) == len(copies) + len(second)  # the earlier corpus is not signed again
    removed = report["stages"][1]["removed"]
    for n in range(1, 6):
        assert removed[f"{batch}:{n}"].startswith(f"near duplicate of {tmp_path / 'a.jsonl'}:{kept_before[n - 1]} ")
    alone = curate(Options([write_jsonl(tmp_path / "c.jsonl", second)], tmp_path / "c", stages=("fuzzy",), progress=False))
    assert len(removed) == 5 + len(alone["stages"][1]["removed"])
    with pytest.raises(MtnlgError, match="made with --shingle 5 --bands 14 --rows 8 --seed 0; pass the same"):
        curate(Options([batch], tmp_path / "d", stages=("fuzzy",), against=[tmp_path / "a"], minhash=MinHash(seed=1)))
    with pytest.raises(MtnlgError, match="no signatures.npz there"):
        curate(Options([batch], tmp_path / "e", stages=("fuzzy",), against=[tmp_path / "b.jsonl"]))
    for stage_file in (tmp_path / "a/work").glob("*-fuzzy.jsonl"):
        stage_file.unlink()
    with pytest.raises(MtnlgError, match="is gone; keep the work/ folder"):
        curate(Options([batch], tmp_path / "f", stages=("fuzzy",), against=[tmp_path / "a"]))


def test_fuzzy_keeps_the_earliest_input_then_the_longest(tmp_path):
    base = " ".join(synthetic_documents(3, seed=5))
    longer = base + " And one more short sentence here."
    first = write_jsonl(tmp_path / "first.jsonl", [base])
    second = write_jsonl(tmp_path / "second.jsonl", [longer])
    curate(Options([first, second], tmp_path / "out", stages=("fuzzy",), progress=False))
    lines = (tmp_path / "out/documents.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == [str(first)]
    curate(Options([write_jsonl(tmp_path / "both.jsonl", [base, longer])], tmp_path / "out2", stages=("fuzzy",),
                   progress=False))
    assert kept_lines(tmp_path / "out2") == [2]


def words(n: int, start: int = 0) -> str:
    return " ".join(f"word{i}" for i in range(start, start + n))


def test_decontamination_cuts_the_match_with_its_margin_and_names_the_item(tmp_path):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"question": "what does " + words(10, 100), "answer": "yes"}) + "\n"
                    + json.dumps({"question": "short one"}) + "\n")
    contamination = Contamination(task_items(task))
    assert len(contamination.ngrams) == 1  # 13 words -> one 13-gram; the 2-word item is too short to use
    document = words(120) + " what does " + words(10, 100) + " yes " + words(120, 500)
    pieces, items, _ = contamination.clean(document)
    assert items == ["task.jsonl:1"] and len(pieces) == 2
    match = document.index("what does")
    assert pieces[0] == document[: match - 200] and document.endswith(pieces[1])
    assert len(document) - len(pieces[1]) == document.index(" yes ") + len(" yes") + 200


def test_decontamination_rules_whole_short_items_splits_and_common_ngrams(tmp_path):
    rules = Rules()
    item = words(9, 900)  # 8-12 words: used whole
    contamination = Contamination([("t:1", item)], rules)
    assert list(contamination.ngrams) == [tuple(item.split())]
    assert contamination.clean("short " + item + " text")[0] == []  # no piece of 200 characters left
    many = (words(60) + " " + item + " ") * 12  # 12 matches: 13 pieces, more than 10
    pieces, items, why = contamination.clean(many)
    assert pieces == [] and items == ["t:1"] and "more than 10" in why
    grams = {gram for _, _, gram in contamination.matches(item)}
    contamination.ignore_common([grams] * (rules.max_documents + 1))  # in 11 documents: too common
    assert contamination.clean(words(100) + " " + item)[0] == [words(100) + " " + item]


def test_decontamination_matches_through_unicode_forms_and_cuts_in_place():
    item = "İstanbul x² " + words(11, 40)  # "İ".lower() is two characters; "²" is "2" under NFKC
    contamination = Contamination([("t:1", "İSTANBUL x2 " + words(11, 40))])
    document = words(100) + " " + item + " " + words(100, 800)
    pieces, items, _ = contamination.clean(document)
    end = document.rindex(" word50") + len(" word50")
    assert items == ["t:1"] and pieces == [document[: document.index("İ") - 200], document[end + 200 :]]


def test_decontaminate_stage_reports_hits_and_splits(tmp_path):
    task = tmp_path / "task.txt"
    task.write_text(words(13, 700) + "\n")
    clean, dirty = words(80, 2000), words(80) + " " + words(13, 700) + " " + words(80, 300)
    source = write_jsonl(tmp_path / "in.jsonl", [clean, dirty])
    report = curate(Options([source], tmp_path / "out", stages=("decontaminate",), tasks=[task], progress=False))
    ids = [json.loads(line)["id"] for line in (tmp_path / "out/documents.jsonl").read_text().splitlines()]
    assert ids == [f"{source}:1", f"{source}:2#0", f"{source}:2#1"]
    assert report["stages"][1]["hits"] == {f"{source}:2": ["task.txt:1"]}


SENTENCES = [s for doc in synthetic_documents(8, seed=9) for s in doc.split(". ")]
GOOD = ("The committee met on Tuesday to review the budget, and the members agreed that the new plan would have "
        "to be presented to the board with a clear timeline. " + " ".join(synthetic_documents(4, seed=9)))


@pytest.mark.parametrize("text, check", [
    ("Too short to be a document.", "min_words"),
    (GOOD + " " + " ".join(["antidisestablishmentarianism"] * 400), "max_mean_word_length"),
    (GOOD + " #tag" * 60, "max_symbol_ratio"),
    ("\n".join("- " + sentence for sentence in SENTENCES), "max_bullet_lines"),
    ("\n".join(f"{a}. {b} ..." for a, b in zip(SENTENCES[::2], SENTENCES[1::2])), "max_ellipsis_lines"),
    (" ".join(["alpha beta gamma delta"] * 30), "min_stop_words"),
    (GOOD + "\n" + "\n".join(["Click here to subscribe to the newsletter and the offers."] * 30), "max_duplicate_lines"),
    (GOOD + " " + " ".join(f"{i:06d}" for i in range(200)), "min_alpha_words"),
    (GOOD + " " + "the best of the best of the best " * 20, "max_top_2gram"),
    (GOOD + " " + " ".join(SENTENCES[:6]) * 3, "max_duplicate_5gram"),
    (GOOD + " function f(x) { return x; } " * 2, "max_curly_brackets"),
    (GOOD + " Lorem ipsum dolor sit amet.", "lorem_ipsum"),
])
def test_each_quality_check_on_a_crafted_document(text, check):
    assert failed_check(GOOD, Thresholds()) is None
    assert failed_check(text, Thresholds()).split(" ")[0] == check


def test_the_other_quality_checks_by_their_thresholds():
    """Checks that real text rarely trips at the papers' values, each tripped by tightening its threshold."""
    for name, value in [("max_words", 20), ("min_mean_word_length", 8.0), ("max_mean_word_length", 3.0),
                        ("max_top_3gram", 0.001), ("max_top_4gram", 0.001), ("max_duplicate_10gram", 0.0)]:
        text = GOOD + " " + GOOD if name == "max_duplicate_10gram" else GOOD
        thresholds = Thresholds(**{**{"max_duplicate_5gram": 1.0, "max_duplicate_lines": 1.0}, name: value})
        assert failed_check(text, thresholds).split(" ")[0] == name


def test_quality_thresholds_are_configurable_and_reported(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [GOOD, "Too short to be a document."])
    report = curate(Options([source], tmp_path / "out", stages=("quality",), progress=False))
    assert report["stages"][1]["failed_checks"] == {"min_words": 1}
    assert report["stages"][1]["options"]["min_words"] == 50
    relaxed = curate(Options([source], tmp_path / "out2", stages=("quality",), progress=False,
                             quality=Thresholds.parse(["min_words=3", "min_stop_words=0", "max_top_2gram=1",
                                                       "max_top_3gram=1", "max_top_4gram=1"])))
    assert relaxed["stages"][1]["documents_out"] == 2
    with pytest.raises(MtnlgError, match="expected NAME=VALUE"):
        Thresholds.parse(["min_wordz=3"])
    with pytest.raises(MtnlgError, match="is not a int"):
        Thresholds.parse(["min_words=many"])


def test_pii_redaction_with_counts(tmp_path):
    text = ("Write to jane.doe@example.org or j_smith+news@mail.example.co.uk, call +1 (555) 123-4567 or "
            "020 7946 0958; servers 10.0.0.12 and 2001:db8::8a2e:370:7334; card 4111 1111 1111 1111. "
            "Not these: version 1.2.3, 999.1.1.1, 12:30:45, the year 2024, order 12345, card 4111 1111 1111 1112.")
    redacted, counts = pii.redact(text)
    assert counts == {"email": 2, "phone": 2, "ip_address": 2, "card_number": 1}
    assert "<EMAIL> or <EMAIL>" in redacted and "<IP_ADDRESS> and <IP_ADDRESS>" in redacted
    assert "version 1.2.3, 999.1.1.1, 12:30:45, the year 2024, order 12345, card 4111 1111 1111 1112." in redacted
    assert pii.redact("f :: Int -> Int") == ("f :: Int -> Int", {})
    source = write_jsonl(tmp_path / "in.jsonl", [text, "nothing here"])
    report = curate(Options([source], tmp_path / "out", stages=("pii",), progress=False))
    assert report["stages"][1]["redacted"] == {"email": 2, "ip_address": 2, "card_number": 1, "phone": 2, "documents": 1}


def corpus(tmp_path: Path) -> Path:
    planted = planted_corpus(300, seed=2)
    docs = planted.texts + planted.texts[:20] + ["Too short.", "Mail me at someone@example.com. " + GOOD]
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


def test_resume_after_a_kill_between_stages_gives_the_uninterrupted_output(tmp_path, monkeypatch, capsys):
    source = corpus(tmp_path)
    stages = ("exact", "quality", "fuzzy", "pii")
    curate(Options([source], tmp_path / "whole", stages=stages, progress=False))

    def killed(options, previous, stage, workers):  # dies after writing some of its documents
        yield from islice(pipeline._records(previous), 50)
        raise KeyboardInterrupt

    monkeypatch.setitem(pipeline.RUNNERS, "fuzzy", killed)
    with pytest.raises(KeyboardInterrupt):
        curate(Options([source], tmp_path / "resumed", stages=stages, progress=False))
    assert not (tmp_path / "resumed/work/03-fuzzy.jsonl").exists()  # no half-written stage
    monkeypatch.undo()
    capsys.readouterr()
    curate(Options([source], tmp_path / "resumed", stages=stages, progress=False))
    err = capsys.readouterr().err
    assert "exact: done before" in err and "quality: done before" in err and "fuzzy: done before" not in err
    assert (tmp_path / "resumed/documents.jsonl").read_bytes() == (tmp_path / "whole/documents.jsonl").read_bytes()
    changed = curate(Options([source], tmp_path / "resumed", stages=stages, threshold=0.9, progress=False))
    assert changed["stages"][3]["options"]["threshold"] == 0.9  # a changed option reruns its stage


def test_worker_processes_give_the_single_process_output(tmp_path):
    source = corpus(tmp_path)
    for workers in (1, 2):
        curate(Options([source], tmp_path / f"w{workers}", workers=workers, progress=False, keep_removed=True))
    assert (tmp_path / "w1/documents.jsonl").read_bytes() == (tmp_path / "w2/documents.jsonl").read_bytes()
    assert (tmp_path / "w1/removed/fuzzy.jsonl").read_bytes() == (tmp_path / "w2/removed/fuzzy.jsonl").read_bytes()
    removed = [json.loads(line) for line in (tmp_path / "w1/removed/exact.jsonl").read_text().splitlines()]
    assert len(removed) == 20 and all(r["reason"].startswith("exact duplicate of") and r["text"] for r in removed)


def test_a_local_dask_cluster_gives_the_process_pool_output(tmp_path):
    pytest.importorskip("distributed", reason="Dask's distributed scheduler is not installed (pip install 'mtnlg[cluster]')")
    source = corpus(tmp_path)
    for name, cluster in (("pool", None), ("dask", "local")):
        curate(Options([source], tmp_path / name, workers=2, cluster=cluster, progress=False))
    assert (tmp_path / "pool/documents.jsonl").read_bytes() == (tmp_path / "dask/documents.jsonl").read_bytes()


LANGUAGES = {
    "en": "The river runs through the old town, and in the evening the people walk along its banks to watch the "
          "boats come home. Nobody remembers when the first bridge was built.",
    "de": "Der Fluss fließt durch die alte Stadt, und am Abend gehen die Leute an seinem Ufer spazieren, um die "
          "Boote heimkommen zu sehen. Niemand erinnert sich, wann die erste Brücke gebaut wurde.",
    "fr": "La rivière traverse la vieille ville, et le soir les gens se promènent le long de ses rives pour regarder "
          "les bateaux rentrer. Personne ne se souvient de la construction du premier pont.",
    "es": "El río atraviesa el casco antiguo, y por la tarde la gente pasea por sus orillas para ver volver los "
          "barcos. Nadie recuerda cuándo se construyó el primer puente.",
    "ru": "Река протекает через старый город, и вечером люди гуляют по её берегам, чтобы посмотреть, как "
          "возвращаются лодки. Никто не помнит, когда был построен первый мост.",
    "ja": "川は古い町を流れていて、夕方になると人々は岸辺を歩きながら船が帰ってくるのを眺めます。最初の橋がいつ架けられたのか、誰も覚えていません。",
}


def test_language_stage_keeps_and_routes_by_language(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", list(LANGUAGES.values()))
    report = curate(Options([source], tmp_path / "all", stages=("language",), split_languages=True, progress=False))
    assert report["stages"][1]["languages"] == dict.fromkeys(LANGUAGES, 1)
    for code in LANGUAGES:
        [record] = [json.loads(line) for line in (tmp_path / f"all/languages/{code}.jsonl").read_text().splitlines()]
        assert record["language"] == code and record["text"] == LANGUAGES[code]
    report = curate(Options([source], tmp_path / "some", stages=("language",), languages=("de", "ja"), progress=False))
    assert kept_lines(tmp_path / "some") == [2, 6]
    assert report["stages"][1]["removed"][f"{source}:1"] == "language en (probability 1.0)"


def test_curate_then_prepare(tmp_path, capsys):
    source = corpus(tmp_path)
    assert main(["curate", str(source), "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "fuzzy" in out and "wrote" in out
    kept = json.loads((tmp_path / "out/report.json").read_text())["stages"][-1]["documents_out"]
    assert main(["prepare", str(tmp_path / "out"), "--output", str(tmp_path / "data/corpus"), "--vocab-size", "300"]) == 0
    counts = [int(n) for n in re.findall(r"\((\d+) documents", capsys.readouterr().out)]
    assert sum(counts) == kept  # the folder's documents only, not its work files


def test_source_weights_carry_through_to_the_training_blend(tmp_path, capsys):
    from mtnlg.data.loader import build_dataset, parse_blend

    web = write_jsonl(tmp_path / "web.jsonl", synthetic_documents(40, seed=11))
    books = write_jsonl(tmp_path / "books.jsonl", synthetic_documents(20, seed=12))
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({str(web): 0.7, str(books): 0.3}))
    args = ["curate", str(web), str(books), "--output", str(tmp_path / "out"), "--weights", str(weights),
            "--stages", "exact"]
    assert main(args) == 0
    blend = json.loads((tmp_path / "out/blend.json").read_text())
    assert [(b["weight"], b["documents"], b["count"]) for b in blend] == [(0.7, "sources/0-web.jsonl", 40),
                                                                         (0.3, "sources/1-books.jsonl", 20)]
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "out"), "--output", str(tmp_path / "data/c"), "--vocab-size", "300"]) == 0
    assert f"--train.data @{tmp_path / 'data/c'}.blend" in capsys.readouterr().out
    spec = f"@{tmp_path / 'data/c.blend'}"
    assert parse_blend(spec) == [(0.7, str(tmp_path / "data/c-0-web")), (0.3, str(tmp_path / "data/c-1-books"))]
    assert len(build_dataset(spec, "train", 16, 0).datasets) == 2
    weights.write_text(json.dumps({str(web): 1}))
    assert main(args) != 0
    assert "give each input" in capsys.readouterr().err
    weights.write_text(json.dumps({f"{tmp_path}/./web.jsonl": 2, str(books): 1}))  # a key as the user typed it
    copy = write_jsonl(tmp_path / "copy.jsonl", synthetic_documents(20, seed=12))  # all exact duplicates of books
    weights.write_text(json.dumps({f"{tmp_path}/./web.jsonl": 2, str(books): 1, str(copy): 1}))
    assert main(["curate", f"{tmp_path}/./web.jsonl", str(books), str(copy), "--output", str(tmp_path / "out"),
                 "--weights", str(weights), "--stages", "exact"]) == 0
    assert "copy.jsonl: no documents left, so it is not in the blend" in capsys.readouterr().err
    assert [b["count"] for b in json.loads((tmp_path / "out/blend.json").read_text())] == [40, 20]
    assert main(["curate", str(web), "--output", str(tmp_path / "out"), "--stages", "exact"]) == 0
    assert not (tmp_path / "out/blend.json").exists() and not (tmp_path / "out/sources").exists()  # no stale blend


def test_malformed_lines_can_be_skipped_and_are_reported(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n{"other": 1}\n')
    report = curate(Options([tmp_path / "bad.jsonl"], tmp_path / "out", stages=("exact",), on_bad_line="skip",
                            progress=False))
    assert report["stages"][0]["documents_out"] == 1
    assert [line.split(": ")[0] for line in report["stages"][0]["skipped_lines"]] == [f"{tmp_path}/bad.jsonl:2",
                                                                                       f"{tmp_path}/bad.jsonl:3"]


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl"], "missing.jsonl: no such file or directory"),
    (["BAD", "--threshold", "1.5"], "--threshold 1.5 must be in (0, 1]"),
    (["BAD"], "bad.jsonl:2: invalid JSON"),
    (["BAD", "--stages", "exact,fuzzy,shiny"], "unknown stage 'shiny'"),
    (["BAD", "--stages", "decontaminate"], "decontamination needs the task files"),
    (["BAD", "--quality", "min_words"], "expected NAME=VALUE"),
    (["BAD", "--languages", "en", "--stages", "exact"], "need the language stage"),
    (["BAD", "--against", "x", "--stages", "exact"], "it needs the fuzzy stage"),
    (["BAD", "--tasks", "t.txt", "--stages", "exact"], "add decontaminate to --stages"),
])
def test_user_mistakes_get_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    args = [str(tmp_path / "bad.jsonl") if a == "BAD" else a for a in args]
    assert main(["curate", *args, "--output", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
