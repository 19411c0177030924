"""train.select's kept copies of Ray Train's checkpoints, on a local disk and in an S3 bucket (the rule that
chooses the checkpoint is in tests/unit/test_selection.py)."""

import pytest


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_kept_copies_of_checkpoints_local_hard_links_or_in_a_bucket(where, tmp_path, request):
    """The copies train.select keeps of Ray Train's checkpoints: hard links on a local disk (no bytes
    written, and Ray Train deleting its folder leaves them whole), copies in a bucket; a copy a crash
    left without its mark is incomplete, and deleted when the copies are listed."""
    import os
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from sasft_ray.layout import KEPT_MARK, kept
    from sasft_ray.rundir import RunDir
    from sasft_ray.train import copy_checkpoint, kept_steps

    source = tmp_path / "train" / "checkpoint_1"
    (source / "ds").mkdir(parents=True)
    (source / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"state" * 100)
    (source / "latest").write_text("ds")
    root = request.getfixturevalue("bucket") + "/run" if where == "bucket" else str(tmp_path / "run")
    rd = RunDir(root)
    assert kept_steps(rd) == set()  # none yet: no folder either
    copy_checkpoint(SimpleNamespace(path=str(source), filesystem=pafs.LocalFileSystem()), rd, kept(10))
    rd.write_text("{}", kept(10), KEPT_MARK)
    copy_checkpoint(SimpleNamespace(path=str(source), filesystem=pafs.LocalFileSystem()), rd, kept(20))
    assert kept_steps(rd) == {10} and not rd.exists(kept(20))  # 20: no mark, a crash's half copy
    assert rd.read_text(kept(10), "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt") == "state" * 100
    assert rd.read_text(kept(10), "latest") == "ds"
    if where == "local":
        copy = os.stat(rd.local(kept(10), "ds", "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        assert copy.st_ino == os.stat(source / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").st_ino
