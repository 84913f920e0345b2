"""lm-eval backend: per-choice log-likelihoods, rolling log-likelihoods and greedy generations
equal lm-eval's own `hf` (PyTorch) backend on the same folder; the launcher writes results."""

import json
import shutil

import numpy as np
import pytest
from hf_models import tiny_hf_model
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from cbd_jax.checkpoints import assets
from cbd_jax.distill import bridge_data
from cbd_jax.evaluation import harness
from cbd_jax.evaluation.lm_backend import JaxLM, padded_length
from cbd_jax.evaluation.lm_tasks import news_next

TASK = "cbd_test_news_mc"
TASK_YAML = """task: TASK
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
metadata:
  version: 1.0
"""


def _save(model, folder):
  """A tiny model with the real GPT-2 tokenizer (50,257 ids), as a transformers folder."""
  vocab, merges = assets.gpt2_tokenizer_files()
  model.save_pretrained(folder)
  bridge_data.load_student_tokenizer(f"{vocab},{merges}").save_pretrained(folder)
  return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Tiny random GPT-2 (tied, learned positions) and Llama (untied, rope), 128 positions."""
  gpt2 = tiny_hf_model("gpt2", vocab=50257, tie=True, n_positions=128)
  llama = tiny_hf_model("llama", vocab=50257, max_position_embeddings=128)
  return {"gpt2": _save(gpt2, tmp_path_factory.mktemp("gpt2")),
          "llama": _save(llama, tmp_path_factory.mktemp("llama"))}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def folder(request, folders):
  return folders[request.param]


@pytest.fixture(scope="module")
def backends(folder):
  ours = JaxLM(pretrained=folder, batch_size=6)  # Rounded up to 8 rows: one per device.
  return ours, HFLM(pretrained=folder, device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """A local lm-eval multiple-choice task: YAML and JSON data file (news text, 4 choices)."""
  folder = tmp_path_factory.mktemp("tasks")
  docs = news_next.news_next_docs(assets.english_text()["heldout"], num_docs=10, seed=1,
                                  context_sentences=1)
  data = folder / "mc.jsonl"  # One JSON document a line, as datasets' "json" builder reads.
  data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                  encoding="utf-8")
  (folder / f"{TASK}.yaml").write_text(TASK_YAML.replace("TASK", TASK).replace("DATA", str(data)))
  return str(folder)


def test_padded_lengths_are_few_and_fit():
  assert [padded_length(n, 1024) for n in (1, 32, 33, 100, 600, 1024)] == [32, 32, 64, 128, 1024,
                                                                           1024]
  assert padded_length(70, 100) == 128 and padded_length(900, 1000) == 1024  # Multiple of 32.


def test_multiple_choice_task_matches_hf_backend(folder, backends, task_dir):
  import lm_eval

  ours, hf = backends
  results = harness.evaluate_model(folder, TASK, include_path=task_dir, log_samples=True,
                                   batch_size=6)
  manager = harness.check_tasks([TASK], task_dir)
  oracle = lm_eval.simple_evaluate(model=hf, tasks=[TASK], task_manager=manager, log_samples=True,
                                   bootstrap_iters=1000)
  mine = {s["doc_id"]: s for s in results["samples"][TASK]}
  theirs = {s["doc_id"]: s for s in oracle["samples"][TASK]}
  assert sorted(mine) == sorted(theirs) == list(range(10))
  for doc_id, sample in theirs.items():
    want = np.array([r[0] for r in sample["filtered_resps"]], np.float64)
    got = np.array([r[0] for r in mine[doc_id]["filtered_resps"]], np.float64)
    assert want.shape == got.shape == (4,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert [r[1] for r in mine[doc_id]["filtered_resps"]] == [
        r[1] for r in sample["filtered_resps"]]
  for metric in ("acc,none", "acc_norm,none"):
    assert results["results"][TASK][metric] == oracle["results"][TASK][metric]
  written = json.loads(harness.results_path(folder).read_text())
  assert written["config"]["model"] == "cbd_jax" and "samples" not in written
  scores = harness.read_task_scores(folder)
  assert scores == {TASK: {"acc": oracle["results"][TASK]["acc,none"],
                           "acc_norm": oracle["results"][TASK]["acc_norm,none"]}}
  assert harness.format_task_scores(scores).startswith(f"{TASK} acc ")


def test_rolling_loglikelihood_matches_hf_over_several_windows(backends):
  ours, hf = backends
  text = assets.english_text()["heldout"].read_text(encoding="utf-8")[:2500]
  requests = [Instance("loglikelihood_rolling", {}, (text[:n],), i)
              for i, n in enumerate([40, 300, 2500])]  # The longest spans 4 windows of 128.
  assert len(ours.tok_encode(text)) > 3 * ours.max_length
  got, want = ours.loglikelihood_rolling(requests), hf.loglikelihood_rolling(requests)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
  assert got[0] > got[1] > got[2]


def test_greedy_generation_matches_hf(backends):
  ours, hf = backends
  prompts = ["The weather today", "Once upon a time there was a", "A", "Fire crews said that"]
  plain = {"until": ["\n\n"], "max_gen_toks": 10, "do_sample": False}
  requests = [Instance("generate_until", {}, (p, plain), i) for i, p in enumerate(prompts)]
  got = ours.generate_until(requests)
  assert got == hf.generate_until(requests)
  assert all(len(ours.tok_encode(g)) >= 8 for g in got)  # Ran to max_gen_toks (no stop hit).
  # A stop string from the middle of a generation cuts it there, as in hf.
  stop = got[1][len(got[1]) // 2:][:4]
  cut = [Instance("generate_until", {}, (p, dict(plain, until=[stop])), i)
         for i, p in enumerate(prompts)]
  got_cut = ours.generate_until(cut)
  assert got_cut == hf.generate_until(cut)
  assert got_cut[1] == got[1].split(stop)[0] and len(got_cut[1]) < len(got[1])


def test_launcher_writes_results_the_report_shows(folders, task_dir, tmp_path, capsys):
  import importlib.util
  from pathlib import Path

  from cbd_jax.chain import report

  path = Path(__file__).parent.parent / "launch" / "evaluate.py"
  spec = importlib.util.spec_from_file_location("evaluate_launcher", path)
  launcher = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launcher)
  folder = str(tmp_path / "model")
  shutil.copytree(folders["gpt2"], folder)  # A folder of its own: results are written in it.
  assert launcher.main([f"--model={folder}", f"--tasks={TASK}", f"--include_path={task_dir}",
                        "--limit=4", "--batch_size=8"]) == 0
  written = harness.results_path(folder)
  assert json.loads(written.read_text())["results"][TASK]["sample_len"] == 4
  models = [{"name": "t", "role": "target", "path": folder, "anchors": ["a", "b"], "alpha": 0.5,
             "tokens": 0, "teacher_flops": 0}]
  text = assets.english_text()["heldout"]
  models = report.evaluate_models(models, text, eval_tokens=256, seq_len=64)
  assert models[0]["tasks"] == harness.read_task_scores(folder) != {}
  printed = report.format_report({"heldout": {"file": str(text), "eval_tokens": 256,
                                              "seq_len": 64}, "models": models,
                                  "chain_tokens": 0, "chain_teacher_flops": 0.0,
                                  "files": {"manifest": "m", "anchors": [], "targets": [folder],
                                            "metrics": "x", "report": "r"}})
  assert f"t tasks: {TASK} acc " in printed
  assert launcher.main([f"--model={folder}", "--tasks=no_such_task_x",
                        f"--include_path={task_dir}"]) == 2
  assert "unknown task(s) no_such_task_x" in capsys.readouterr().err
  assert launcher.main([f"--model={tmp_path}/missing", f"--tasks={TASK}",
                        f"--include_path={task_dir}"]) == 2
  assert "no such file or folder" in capsys.readouterr().err
  assert launcher.main([f"--model={folder}", f"--tasks={TASK}", "--include_path=/no/dir"]) == 2
  assert "not a folder" in capsys.readouterr().err
  assert json.loads(written.read_text())["results"][TASK]["sample_len"] == 4  # Kept.


def test_misspelled_model_argument_is_refused():
  with pytest.raises(ValueError, match=r"unknown cbd_jax model argument\(s\) \['dtyp'\]"):
    JaxLM(pretrained="unused", dtyp="bfloat16")


def test_news_task_true_sentence_follows_its_context():
  text = assets.english_text()["heldout"].read_text(encoding="utf-8")
  dataset = news_next.load(num_docs=20, seed=3)["test"]
  assert len(dataset) == 20 and dataset[0] == news_next.load(num_docs=20, seed=3)["test"][0]
  for doc in dataset:
    assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
    assert f"{doc['context']} {doc['choices'][doc['label']]}" in text
    others = [c for i, c in enumerate(doc["choices"]) if i != doc["label"]]
    assert all(f"{doc['context']} {c}" not in text for c in others)
  assert len({doc["label"] for doc in dataset}) > 1  # The answer's place is shuffled.
  assert "cbd_news_next" in harness.check_tasks(["cbd_news_next"]).all_tasks


def test_results_of_earlier_tasks_are_kept(tmp_path):
  path = tmp_path / "lm_eval" / "results.json"
  harness.write_results({"results": {"a": {"acc,none": 0.5}}, "versions": {"a": 1},
                            "samples": {"a": []}}, path)
  harness.write_results({"results": {"b": {"acc,none": 0.25, "acc_stderr,none": 0.1},
                                        "a": {"acc,none": 0.75}}, "versions": {"b": 2}}, path)
  written = json.loads(path.read_text())
  assert written["results"] == {"a": {"acc,none": 0.75},
                                "b": {"acc,none": 0.25, "acc_stderr,none": 0.1}}
  assert written["versions"] == {"a": 1, "b": 2} and "samples" not in written
  assert harness.read_task_scores(tmp_path) == {"a": {"acc": 0.75}, "b": {"acc": 0.25}}
