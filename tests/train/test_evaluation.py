"""launch/evaluate.py, training's long-document validation and their pieces: the choice of long
documents against a hand count, the windows over whole documents (every predicted token once, from
its own document only), ``valid_long/*`` in metrics.jsonl and launch/evaluate.py reproducing it
from the checkpoint, the evaluation against plain forwards over the same documents, the same
numbers under torchrun ranks, and the one-line errors."""

import json

import numpy as np
import pytest
import torch

from data.evaluation import DocumentWindows, EvaluationLoader
from data.packing import DocumentCorpus
from tests.helpers.data import EOS, make_documents, write_shard
from tests.helpers.distributed import torchrun
from tests.helpers.small_models import ROOT, small_run

# validation documents (EOS included) around the cut of 100 tokens and the 16-token windows below
VALID_LENGTHS = [30, 150, 12, 300, 99, 100, 200, 5, 129, 40]


def _position_corpus(tmp_path, lengths):
    """Documents whose token at position p of document d is 1 + 1000 d + p (the last one EOS-free):
    every token says where it comes from."""
    docs = [np.arange(n) + 1 + 1000 * d for d, n in enumerate(lengths)]
    corpus = DocumentCorpus(write_shard(tmp_path / "positions", docs))
    return corpus, docs


def _predictions(windows, micro, dp_size=1):
    """(input token, label, previous inputs of its cu_seqlens segment) of every position with loss."""
    seen = []
    for rank in range(dp_size):
        loader = EvaluationLoader(windows, micro, rank, dp_size)
        for _ in range(loader.num_global_batches):
            batch = next(loader)
            tokens, labels = batch["tokens"].reshape(-1), batch["labels"].reshape(-1)
            mask, bounds = batch["loss_mask"].reshape(-1), batch["cu_seqlens"].tolist()
            for start, end in zip(bounds[:-1], bounds[1:]):
                for i in range(start, end):
                    if mask[i]:
                        seen.append((int(tokens[i]), int(labels[i]), tokens[start:i].tolist()))
    return seen


@pytest.mark.parametrize("min_length,max_tokens,dp_size", [(0, 0, 1), (100, 0, 2), (100, 250, 1)])
def test_windows_predict_each_token_of_the_chosen_documents_once_from_its_own_window(
        tmp_path, min_length, max_tokens, dp_size):
    seq_length = 16
    corpus, docs = _position_corpus(tmp_path, VALID_LENGTHS)
    windows = DocumentWindows([(corpus, np.arange(len(docs)))], seq_length, min_length, max_tokens)
    seen = _predictions(windows, micro=3, dp_size=dp_size)
    chosen = {d for d, n in enumerate(VALID_LENGTHS) if n >= min_length}
    labels = sorted(label for _, label, _ in seen)
    assert len(labels) == len(set(labels)) == windows.predicted  # each once; the count the evaluation uses
    by_doc = {}
    for label in labels:
        by_doc.setdefault((label - 1) // 1000, []).append((label - 1) % 1000)
    if max_tokens:
        assert windows.predicted == max_tokens
        assert set(by_doc) <= chosen
        # whole documents but the last, each from its start
        assert sum(1 for d, pos in by_doc.items() if pos == list(range(1, VALID_LENGTHS[d]))) >= len(by_doc) - 1
        assert all(pos == list(range(1, len(pos) + 1)) for pos in by_doc.values())
    else:
        assert set(by_doc) == chosen  # the filter keeps the long documents, all of them
        assert all(pos == list(range(1, VALID_LENGTHS[d])) for d, pos in by_doc.items())
        assert windows.documents == len(chosen)
    for token, label, before in seen:
        assert label == token + 1  # the next token of the same document
        position = (token - 1) % 1000
        # the context is this document from the start of its window: position // S * S
        assert before == list(range(token - position % seq_length, token))


@pytest.mark.parametrize("min_length,documents,predicted", [
    (0, 10, sum(VALID_LENGTHS) - 10),
    (100, 5, 149 + 299 + 99 + 199 + 128),  # 150, 300, 100, 200, 129: the cut is inclusive
    (150, 3, 149 + 299 + 199),
    (300, 1, 299),
])
def test_long_documents_are_those_of_at_least_the_threshold(tmp_path, min_length, documents, predicted):
    corpus, docs = _position_corpus(tmp_path, VALID_LENGTHS)
    windows = DocumentWindows([(corpus, np.arange(len(docs)))], 64, min_length)
    assert (windows.documents, windows.predicted) == (documents, predicted)
    assert windows.longest == 300


def test_no_document_long_enough_names_the_flag_and_the_longest(tmp_path):
    from train.errors import DataError
    from train.evaluation import select_windows

    corpus, docs = _position_corpus(tmp_path, VALID_LENGTHS)
    with pytest.raises(DataError, match=r"at least --eval-long-min-length 301 tokens \(the longest has 300\); "
                                        r"lower --eval-long-min-length or use X"):
        select_windows([(corpus, np.arange(len(docs)))], 64, 301, 0, "the data", "--eval-long-min-length", "use X")


def test_validation_documents_are_those_the_validation_loader_reads(tmp_path):
    from data import build_pretraining_loaders, validation_documents

    corpus, docs = _position_corpus(tmp_path, [40] * 10)
    prefix = str(tmp_path / "positions")
    [(_, ids)] = validation_documents([prefix], split=(0.8, 0.2))
    assert ids.tolist() == [8, 9]  # the last fifth of 10 documents
    _, valid = build_pretraining_loaders([prefix], split=(0.8, 0.2), seq_length=16, micro_batch_size=2,
                                         global_batch_size=2)
    read = {(int(t) - 1) // 1000 for _ in range(20) for t in next(valid)["labels"].reshape(-1) if t > 0}
    assert read == {8, 9}
    [(_, every)] = validation_documents(valid_prefixes=[prefix])
    assert every.tolist() == list(range(10))
    assert validation_documents([prefix], split=(1.0, 0.0)) == []


def _train_on_corpus_with_long_documents(folder, **train_settings):
    from parallel.state import destroy
    from train.loop import train

    train_prefix = write_shard(folder / "train", make_documents(60, seed=1))
    rng = np.random.default_rng(2)
    valid = [np.append(rng.integers(1, 100, size=n - 1), EOS) for n in VALID_LENGTHS]
    valid_prefix = write_shard(folder / "valid", valid)
    run = small_run(folder, train_iters=4, save=str(folder / "run"), run_dir=str(folder / "run"),
                    data_prefixes=[train_prefix], valid_prefixes=[valid_prefix], seq_length=32, **train_settings)
    train(run)
    destroy()
    return valid, valid_prefix


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run validated every 2 steps, with the loss on documents of >= 100 tokens."""
    folder = tmp_path_factory.mktemp("trained")
    valid, valid_prefix = _train_on_corpus_with_long_documents(folder, eval_interval=2, eval_long_min_length=100)
    return folder, valid, valid_prefix


def test_long_document_loss_is_logged_with_the_validation_and_evaluate_reproduces_it(trained, tmp_path, capsys):
    from launch.evaluate import main

    folder, valid, _ = trained
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    long_records = [r for r in records if "valid_long/loss" in r]
    assert [r["step"] for r in long_records] == [2, 4]
    for record in long_records:
        assert "valid/loss" in record and record["consumed_tokens"] == record["step"] * 4 * 32
        assert record["valid_long/documents"] == 5 and record["valid_long/min_length"] == 100
        assert record["valid_long/tokens"] == 149 + 299 + 99 + 199 + 128
        assert record["valid_long/ppl"] == pytest.approx(np.exp(record["valid_long/loss"]))
    assert long_records[0]["valid_long/loss"] != long_records[1]["valid_long/loss"]

    # after the fact, from the step-4 checkpoint, with the run's settings (threshold, windows, batch)
    out = tmp_path / "long.json"
    assert main(["--load", str(folder / "run"), "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"] == 4 and result["min_document_length"] == 100 and result["seq_length"] == 32
    assert result["loss"] == pytest.approx(long_records[1]["valid_long/loss"], rel=1e-6)
    # and against plain forwards over the long documents, one window per forward
    expected, count = _plain_forward_loss(folder / "run", [d for d in valid if len(d) >= 100], 32)
    assert result["predicted_tokens"] == count
    assert result["loss"] == pytest.approx(expected, rel=1e-5)


def test_training_refuses_long_document_settings_it_cannot_honour(tmp_path):
    from model.config import ConfigError
    from parallel.state import destroy
    from train.errors import DataError
    from train.loop import build_data, train

    with pytest.raises(ConfigError, match="--eval-long-min-length=100 needs --eval-interval N"):
        train(small_run(tmp_path, train_iters=1, eval_long_min_length=100))
    destroy()
    with pytest.raises(DataError, match=r"no document of the run's validation data has at least "
                                        r"--eval-long-min-length 100000 tokens \(the longest has 6,084\); lower "
                                        r"--eval-long-min-length or give validation documents that are longer"):
        train(small_run(tmp_path, train_iters=1, eval_interval=1, eval_long_min_length=100000))
    destroy()
    with pytest.raises(ConfigError, match="this run's data comes from elsewhere"):
        train(small_run(tmp_path, train_iters=1, eval_interval=1, eval_long_min_length=100), data=build_data)
    destroy()


def _plain_forward_loss(checkpoint, docs, seq_length):
    """Mean loss of every document on its own, window by window, one sequence per forward."""
    from parallel.state import destroy
    from train.checkpoint import load_model_for_inference

    model = load_model_for_inference(checkpoint)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor(doc, dtype=torch.long)
            for start in range(0, len(doc) - 1, seq_length):
                stop = min(start + seq_length, len(doc) - 1)
                per_token = model(ids[start:stop][None], labels=ids[start + 1:stop + 1][None])
                total += float(per_token.double().sum())
                count += stop - start
    destroy()
    return total / count, count


@pytest.mark.slow
def test_evaluation_equals_plain_forwards_over_the_long_documents_and_under_ranks(trained, tmp_path, capsys):
    from launch.evaluate import main

    folder, valid, valid_prefix = trained
    long_docs = [doc for doc in valid if len(doc) >= 100]
    out = tmp_path / "eval_long.json"
    args = ["--load", str(folder / "run"), "--min-document-length", "100", "--seq-length", "48",
            "--micro-batch-size", "2", "--no-progress"]
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    result = json.loads(out.read_text())
    expected, count = _plain_forward_loss(folder / "run", long_docs, 48)
    assert result["documents"] == len(long_docs) == 5 and result["predicted_tokens"] == count
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert result["step"] == 4 and result["seq_length"] == 48 and result["min_document_length"] == 100
    assert line.startswith("evaluation of ") and f"loss {result['loss']:.4f}" in line
    assert "5 documents of >= 100 tokens" in line

    # every validation document, given as --data-path, is a different (larger) set
    assert main([*args[:2], "--data-path", valid_prefix, "--min-document-length", "0", "--seq-length", "48",
                 "--no-progress",
                 "--out", str(tmp_path / "all.json")]) == 0
    every, count = _plain_forward_loss(folder / "run", valid, 48)
    result_all = json.loads((tmp_path / "all.json").read_text())
    assert result_all["loss"] == pytest.approx(every, rel=1e-5) and result_all["predicted_tokens"] == count
    assert abs(result_all["loss"] - result["loss"]) > 1e-4

    # two torchrun ranks, tensor parallel: the single-process checkpoint resharded (the data-parallel
    # split of the windows is the first test's)
    ranked = tmp_path / "ranks.json"
    torchrun(ROOT / "launch" / "evaluate.py", 2, *args, "--out", ranked, "--tensor-model-parallel-size", "2")
    result_ranked = json.loads(ranked.read_text())
    assert result_ranked["world_size"] == 2 and result_ranked["layout"]["tensor"] == 2
    assert result_ranked["loss"] == pytest.approx(result["loss"], rel=1e-5)
    assert result_ranked["predicted_tokens"] == result["predicted_tokens"]
    # two data-parallel ranks: each reads its share of the windows, the last global batch half padding
    torchrun(ROOT / "launch" / "evaluate.py", 2, *args, "--out", ranked)
    result_ranked = json.loads(ranked.read_text())
    assert result_ranked["layout"]["data"] == 2 and result_ranked["samples"] % 4 != 0
    assert result_ranked["loss"] == pytest.approx(result["loss"], rel=1e-5)


def test_errors_are_one_line(tmp_path, capsys):
    from launch.evaluate import main
    from parallel.state import destroy
    from train.loop import train

    train(small_run(tmp_path, train_iters=1, save=str(tmp_path / "run")))
    destroy()
    capsys.readouterr()
    cases = [
        (["--min-document-length", "100000"],
         "no document of the run's validation data has at least --min-document-length 100000 tokens (the longest "
         "has 6,084)"),
        (["--data-path", str(tmp_path / "missing")], "evaluation data: data prefix"),
        (["--seq-length", "0"], "--seq-length=0: must be >= 1"),
    ]
    for extra, needle in cases:
        assert main(["--load", str(tmp_path / "run"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    # the run's validation data is gone (trained elsewhere, moved)
    prefix = write_shard(tmp_path / "data", make_documents(300, seed=3))
    train(small_run(tmp_path, train_iters=1, save=str(tmp_path / "moved"), data_prefixes=[prefix]))
    destroy()
    for suffix in (".bin", ".idx"):
        (tmp_path / f"data{suffix}").unlink()
    capsys.readouterr()
    assert main(["--load", str(tmp_path / "moved")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: evaluation data: data prefix") and "data.bin" in err
    assert main(["--load", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
