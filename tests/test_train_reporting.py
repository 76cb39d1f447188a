"""What a run tells its user: compile notice, closing line, a finished run rerun, a changed
curriculum on resume, metrics.jsonl cut back to the restored step."""
from __future__ import annotations

import json

import ml_collections
import orbax.checkpoint as ocp

from cmjax.training import resume, run_checkpoints, train_and_evaluate
from configs import digits_tiny


def _write_lines(path, lines):
    path.write_text("".join(lines))


def test_truncate_metrics_drops_records_past_the_step_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": float(s)} for s in (0, 5, 10, 15)]  # 15: logged after the checkpoint at 10
    _write_lines(path, [json.dumps(r) + "\n" for r in records] + ['{"step": 20, "lo'])  # killed mid-write
    assert resume.truncate_metrics(str(path), 10) == 2
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 5, 10]
    assert resume.truncate_metrics(str(path), 10) == 0  # nothing more to drop: the file is untouched
    assert resume.truncate_metrics(str(tmp_path / "none.jsonl"), 3) == 0


def test_curriculum_change_names_both_lengths_and_the_fix():
    """digits_tiny iCT (s0=10, s1=160): K' = floor(K / (log2(16) + 1)) = K // 5, N = min(10 * 2^(k//K'), 160) + 1.
    Saved with total_steps 40 (K' = 8): N(40) = 161. Resumed with total_steps 80 (K' = 16): N(40) = 41."""
    saved = digits_tiny.get_config()
    saved.total_steps = 40
    config = digits_tiny.get_config()
    config.total_steps = 80
    message = resume.curriculum_change(saved.to_dict(), config, 40)
    assert "K changed from 40 to 80" in message and "N(k) is now 41 instead of 161" in message
    assert "--config.curriculum_steps=40" in message
    config.curriculum_steps = 40  # pinned: the same curriculum, no warning
    assert resume.curriculum_change(saved.to_dict(), config, 40) is None
    config.curriculum_steps, config.algorithm = 0, "edm"  # no curriculum
    assert resume.curriculum_change(saved.to_dict(), config, 40) is None
    config.algorithm = "ct"  # CT's K is total_steps too: N(40) = ceil(sqrt(40/80 * (51^2 - 4) + 4) - 1) + 1 = 37
    saved.algorithm = "ct"
    assert "N(k) is now 37 instead of 51" in resume.curriculum_change(saved.to_dict(), config, 40)


def test_finished_run_says_so_and_where_its_outputs_are(tmp_path, capsys):
    c = digits_tiny.get_config()
    c.model.base_channels, c.model.channel_mult, c.model.num_groups = 8, (1,), 4
    c.batch_size, c.total_steps, c.log_every, c.checkpoint_every, c.sample_every = 8, 2, 1, 2, 0
    c.tensorboard = False
    workdir = tmp_path / "run"
    train_and_evaluate(c, str(workdir))
    out = capsys.readouterr().out
    assert "compiling the train step (once per input shape)" in out
    closing = f"finished step 2/2: checkpoints in {workdir}/checkpoints; metrics in {workdir}/metrics.jsonl"
    assert out.splitlines()[-1] == closing
    # The same command again: nothing to train, and it says so.
    train_and_evaluate(c, str(workdir))
    out = capsys.readouterr().out
    assert f"resumed from {workdir}/checkpoints/2" in out
    assert "the run is complete: step 2 of total_steps=2" in out and "compiling" not in out
    assert out.splitlines()[-1] == closing
    # The saved config is what curriculum_change compares with.
    manager = run_checkpoints.make_manager(str(workdir))
    saved = resume.saved_config(manager, 2)
    manager.close()
    longer = ml_collections.ConfigDict(c.to_dict())
    longer.total_steps = 400
    assert saved["total_steps"] == 2 and "K changed from 2 to 400" in resume.curriculum_change(saved, longer, 2)
    assert [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_reading_a_run_logs_no_read_only_notices(tmp_path, caplog):
    """eval/edit open a run's checkpoints read-only; orbax's notices about that (one claiming the
    directory is read only) are not shown, other warnings are."""
    import logging

    from cmjax.training.trained import read_run_config

    c = digits_tiny.get_config()
    manager = run_checkpoints.make_manager(str(tmp_path), async_save=False)
    manager.save(3, args=ocp.args.Composite(config=ocp.args.JsonSave(run_checkpoints.config_json(c))))
    manager.close()
    with caplog.at_level(logging.WARNING):
        config, step = read_run_config(str(tmp_path))
        logging.getLogger("absl").warning("a warning to act on")
    assert step == 3 and config.total_steps == c.total_steps
    assert [r.getMessage() for r in caplog.records] == ["a warning to act on"]
