"""The chain manifest reader: valid manifests load, malformed ones give one line naming the file."""

import json

import pytest

from cbd_jax.checkpoints import manifest

SOURCE = {"path": "/models/src", "num_params": 1000, "config": {"family": "llama"}}
DONE = {"name": "a1", "path": "anchors/a1", "status": "done", "num_params": 500,
        "config": {"family": "llama"}}
PENDING = {"name": "a2", "path": "anchors/a2", "status": "pending", "num_params": None,
           "config": None}


def _write(tmp_path, doc):
  (tmp_path / manifest.MANIFEST).write_text(json.dumps(doc))
  return tmp_path


def test_a_valid_manifest_reads_back_and_lists_finished_anchors(tmp_path):
  doc = {"source": SOURCE, "anchors": [DONE, PENDING], "config": {}}
  read = manifest.read(_write(tmp_path, doc))
  assert read == doc
  assert [a["name"] for a in manifest.done_anchors(read)] == ["a1"]


@pytest.mark.parametrize(("doc", "why"), [
    ({}, "top level"),
    ([], "top level"),
    ({"anchors": []}, "no 'source'"),
    ({"source": SOURCE}, "no 'anchors'"),
    ({"source": SOURCE, "anchors": {}}, "not a list"),
    ({"source": dict(SOURCE, config=None), "anchors": []}, "source lacks config"),
    ({"source": SOURCE, "anchors": [dict(DONE, num_params=None)]}, r"anchors\[0\] lacks"),
    ({"source": SOURCE, "anchors": [[1, 2]]}, "is a list"),
])
def test_malformed_manifests_give_one_line_naming_the_file_and_fix(tmp_path, doc, why):
  with pytest.raises(ValueError, match=why) as err:
    manifest.read(_write(tmp_path, doc))
  message = str(err.value)
  assert "\n" not in message and str(tmp_path / manifest.MANIFEST) in message
  assert "rebuild the chain" in message


def test_missing_and_broken_manifests(tmp_path):
  with pytest.raises(FileNotFoundError, match="build the chain first"):
    manifest.read(tmp_path)
  assert manifest.load(tmp_path) is None
  (tmp_path / manifest.MANIFEST).write_text("{not json")
  with pytest.raises(ValueError, match="invalid JSON"):
    manifest.read(tmp_path)
