"""What a new user of `lorakit train` relies on in the first hour: settings files written as people write
them, files others can read, no stray warnings, no folders left by failed attempts, the run header,
epochs and the data's own column names.

Real `lorakit` subprocesses on the tiny model folder of test_train.py, with real files in tmp_path.
"""

from __future__ import annotations

import csv
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_portable_adapters import hub  # noqa: F401 (fixture: a local stand-in for the hub)
from test_train import lorakit, train_args  # noqa: F401 (model_folder and skill_files come from conftest.py)

from lorakit.errors import TrainError
from lorakit.train.config import TrainConfig
from lorakit.train.settings_file import read_config_file


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single error line of a refused command (status 2, no traceback)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- settings files ---------------------------------------------------------------------------------------

def test_a_yaml_file_in_hf_spellings_and_scientific_notation_trains(model_folder, skill_files, tmp_path):
    settings = tmp_path / "run.yaml"
    settings.write_text(f"""\
model_name_or_path: {model_folder}
train_file: {skill_files['train']}
validation_file: {skill_files['heldout']}
output_dir: {tmp_path / 'run'}
learning_rate: 1e-2
warmup_ratio: 5e-2
weight_decay: 1E-4
lora_r: 4
lora_alpha: 8
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
max_seq_length: 64
max_steps: 2e0
lr_scheduler_type: constant_with_warmup
eval_samples: 2
progress: false
""")
    result = lorakit("train", settings)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert (config["lr"], config["warmup_ratio"], config["weight_decay"]) == (1e-2, 5e-2, 1e-4)
    assert (config["r"], config["batch_size"], config["max_length"], config["max_steps"]) == (4, 4, 64, 2)
    assert config["schedule"] == "constant"


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "run.yaml: lr must be a number; got 'fast'"),
    ("max_steps: 1.5\n", "max_steps must be a whole number; got 1.5"),
    ("r: [4]\n", "r must be a whole number"),
    ("learnin_rate: 1e-3\n", "did you mean 'learning_rate'?"),
    ("per_device_batch_size: 4\n", "did you mean 'per_device_train_batch_size'?"),
    ("lr: 1e-3\nlearning_rate: 2e-3\n", "'learning_rate' sets 'lr', which the file already sets"),
    ("fp16: true\n", "fp16: true is not supported"),
    ("push_to_hub: true\n", "push_to_hub: true needs the repository"),
    ("lr: .nan\n", "lr must be a number"),
    ("lr_scheduler_type: polynomial\n", "'polynomial' is not a schedule lorakit has"),
    ("report_to: [tensorboard, comet]\n", "report_to takes tensorboard, wandb, mlflow"),
])
def test_every_bad_value_in_a_settings_file_is_one_line(tmp_path, capsys, text, expected):
    """In-process (`lorakit.cli.main`, what the command runs), as these are refused before any loading."""
    from lorakit.cli import main

    settings = tmp_path / "run.yaml"
    settings.write_text(text)
    code = main(["train", str(settings), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = one_line_error(subprocess.CompletedProcess([], code, "", err))
    assert expected in line
    assert not (tmp_path / "out").exists()


def test_numbers_read_the_same_from_json_and_hf_switches_translate(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"learning_rate": "3e-4", "num_train_epochs": 2, "bf16": True, "save_steps": 1e2,
                                "push_to_hub": True, "hub_model_id": "me/my-adapter"}))
    values = read_config_file(path)
    assert values == {"lr": 3e-4, "num_epochs": 2.0, "precision": "bf16", "save_steps": 100,
                      "push_to_hub": "me/my-adapter"}
    assert TrainConfig(**values).save_steps == 100


def test_the_library_checks_types_too():
    with pytest.raises(TrainError, match="batch_size must be a whole number; got 'four'"):
        TrainConfig(batch_size="four")
    assert TrainConfig(lr="1e-3").lr == 1e-3


def test_max_steps_and_num_epochs_as_flags_together_are_refused(tmp_path):
    line = one_line_error(lorakit("train", "--max-steps", 3, "--num-epochs", 1, "--output", tmp_path / "o"))
    assert "give one" in line


def test_the_schedule_matches_transformers(tmp_path):
    from transformers import get_scheduler

    from lorakit.train.schedule import lr_schedule

    for kind, theirs in (("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup")):
        ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        ours, hf = lr_schedule(ours_opt, kind, 7, 50), get_scheduler(theirs, hf_opt, num_warmup_steps=7,
                                                                    num_training_steps=50)
        for _ in range(55):
            assert ours.get_last_lr() == hf.get_last_lr()
            ours_opt.step(), hf_opt.step(), ours.step(), hf.step()


# -- what a default run prints and writes -----------------------------------------------------------------

def test_a_default_run_prints_no_foreign_warning_and_writes_files_others_can_read(tmp_path):
    """The default run (embedded model, example skill), cut to a few steps, under umask 022."""
    out = tmp_path / "run"
    script = ("import os, sys; os.umask(0o022)\n"
              "from lorakit.cli import main\n"
              f"code = main(['train', '--output', {str(out)!r}, '--max-steps', '2', '--eval-samples', '2', "
              "'--save-steps', '1'])\n"
              "print('imported:', sorted(m for m in ('peft', 'bitsandbytes', 'transformers.trainer') "
              "if m in sys.modules))\n"
              "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "imported: []" in result.stdout
    lowered = result.stderr.lower()
    assert "warn" not in lowered and "pip install" not in lowered, result.stderr
    header = result.stderr.split("\n")
    assert any(line.startswith("model lorakit-embedded:") for line in header), result.stderr
    assert any(line.startswith("batch: 4 rows x 256 tokens x 1 accumulation = 1,024 tokens/step; 2 steps = ")
               for line in header)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.name == "adapter_model.safetensors" for p in files)
    unreadable = [f"{oct(stat.S_IMODE(p.stat().st_mode))} {p.relative_to(out)}" for p in files
                  if stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
    assert not unreadable, unreadable


def test_files_follow_a_strict_umask_too(model_folder, skill_files, tmp_path):
    out = tmp_path / "private"
    result = subprocess.run([sys.executable, "-c", "import os, sys; os.umask(0o077); from lorakit.cli import main; "
                             f"sys.exit(main({[str(a) for a in train_args(model_folder, skill_files, out, '--max-steps', 1)]!r}))"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    modes = {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert modes == {0o600}


# -- the output folder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing data", "bad target", "bad model", "too big for memory", "bad column"])
def test_a_failed_run_leaves_no_output_folder(model_folder, skill_files, tmp_path, case):
    out = tmp_path / "never"
    args = {"missing data": ["--data", tmp_path / "nope.jsonl"],
            "bad target": ["--target-modules", "no_such_proj"],
            "bad model": ["--model", tmp_path / "no-model-here"],
            "too big for memory": ["--batch-size", 4096, "--max-length", 65536],
            "bad column": ["--prompt-column", "question"]}[case]
    one_line_error(lorakit("train", "--output", out, "--max-steps", 1, *args))
    assert not out.exists()


def test_a_folder_of_foreign_files_is_refused_unless_overwrite(model_folder, skill_files, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = one_line_error(lorakit(*train_args(model_folder, skill_files, out, "--max-steps", 1)))
    assert "not a lorakit run's (notes.txt)" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = lorakit(*train_args(model_folder, skill_files, out, "--max-steps", 1, "--overwrite"))
    assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter_model.safetensors").is_file()


# -- epochs, resume, columns ------------------------------------------------------------------------------

def test_num_epochs_sets_the_steps_and_a_resume_says_where_it_goes_on(model_folder, skill_files, tmp_path):
    out = tmp_path / "epochs"
    args = ["train", "--model", model_folder, "--data", skill_files["train"], "--eval-data", skill_files["heldout"],
            "--output", out, "--batch-size", 4, "--max-length", 64, "--eval-samples", 2, "--no-progress"]
    result = lorakit(*args, "--num-epochs", 0.5, "--gradient-accumulation-steps", 2)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "train_config.json").read_text())
    batch_line = next(line for line in result.stderr.splitlines() if line.startswith("batch:"))
    steps, passes = re.search(r"; ([\d,]+) steps = ([\d.]+) passes over the data$", batch_line).groups()
    assert int(steps) == config["max_steps"] and config["num_epochs"] == 0.5
    assert 0.5 <= float(passes) < 0.6        # whole optimizer steps: the half pass rounded up
    again = lorakit(*args, "--num-epochs", 0.5, "--gradient-accumulation-steps", 2, "--resume")
    assert again.returncode == 0, again.stderr
    assert f"resuming from step {config['max_steps']} of {config['max_steps']}" in again.stderr


def test_the_datas_own_column_names(model_folder, tmp_path):
    data = tmp_path / "qa.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["q", "a", "note"])
        for i in range(40):
            writer.writerow([f"Repeat: {i}\nAnswer:", f" {i}", "x"])
    out = tmp_path / "run"
    result = lorakit("train", "--model", model_folder, "--data", data, "--prompt-column", "q", "--completion-column",
                     "a", "--output", out, "--max-steps", 2, "--max-length", 64, "--eval-samples", 2, "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "train_report.json").read_text())
    assert report["data"]["train"]["examples"] == 38          # 2 of 40 held out
    wrong = lorakit("train", "--model", model_folder, "--data", data, "--prompt-column", "question",
                    "--completion-column", "a", "--output", tmp_path / "wrong", "--max-steps", 1)
    line = one_line_error(wrong)
    assert "qa.csv:line 3: no column 'question' (asked for by --prompt-column question)" in line  # row 1 ends there
    assert "q, a, note" in line


def test_the_training_page_lists_every_alias():
    from lorakit.train.settings_file import ALIASES

    page = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    missing = [f"{theirs} -> {ours}" for theirs, ours in ALIASES.items() if f"| `{theirs}` | `{ours}` |" not in page]
    assert not missing, missing


# -- the model card and --push-to-hub ---------------------------------------------------------------------

def test_a_run_writes_a_model_card_and_pushes_to_the_hub(model_folder, skill_files, tmp_path, hub):
    """`hub` is test_portable_adapters' local stand-in for the hub's upload API (this machine has no
    internet); the run pushes to it through huggingface_hub as it would to huggingface.co."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lorakit.cli", *map(str, train_args(model_folder, skill_files, out, "--max-steps", 1,
                                                                       "--push-to-hub", "alice/reverse"))]
    no_token = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_HOME": str(tmp_path / "no-login")}
    refused = subprocess.run(args, capture_output=True, text=True, timeout=240, env=no_token)
    assert "needs a Hugging Face token" in one_line_error(refused) and not out.exists()

    env = no_token | {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    assert f"pushed to {hub.url}/alice/reverse" in result.stderr
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and 'ADAPTER = "alice/reverse"' in card
    assert set(hub.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md", "train_config.json",
                              "train_report.json"}
    assert hub.files["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()


def test_hf_spellings_are_flags_too_and_a_mistyped_flag_gets_a_suggestion(capsys):
    from lorakit.cli import main

    assert main(["train", "--learning-rate", "1e-4", "--per-device-train-batch-size", "2", "--num-train-epochs", "3",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["lr"], printed["batch_size"], printed["num_epochs"]) == (1e-4, 2, 3.0)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--gradient-acumulation-steps", "4"])
    assert exit_info.value.code == 2
    assert "--gradient-acumulation-steps: did you mean --gradient-accumulation-steps?" in capsys.readouterr().err
