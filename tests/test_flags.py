"""The flag table (qmor/flags.py) against everything built from it: the CLI parser, the app's form and command
builder, and the README's table. Nothing here loads a model."""

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

from apps import command
from apps.paths import make_workspace
from qmor import flags
from qmor.adapters import ADAPTERS, option_fields
from qmor.errors import QmorError
from qmor.flags import FLAGS, GROUPS, WIDGETS, Flag, by_key, default_of
from qmor.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import finetune_4bit  # noqa: E402
import flags_table  # noqa: E402

# config fields that only a config file sets (no flag): the NF4 block size, double quantisation, the compute dtype
OPTION_NAMES = {f.key: f.name for f in option_fields()}  # flat key -> field in the family's options
FILE_ONLY = {"quant.blocksize", "quant.double_quant", "quant.compute_dtype"}
TEXT_VALUES = {"model": "smollm2", "dataset": "reverse", "targets": "q_proj,v_proj", "output": "runs/x",
               "quant_storage": "bfloat16", "split": "test", "subset": "main", "columns": "prompt=q,completion=a",
               "calibration": "calib.jsonl"}


def other_value(flag: Flag):
    """A valid value for the flag that is not its default (for an auto one: any valid value)."""
    d = flag.default
    if d is None and flag.kind in (int, float):
        d = flag.kind(8)
    if flag.switch:
        return not d
    if flag.choices and flag.shown_as != "combo":
        return next(c for c in flag.choices if c != d)
    if flag.kind is int:
        return d + 1
    if flag.kind is float:
        return d / 2 if d else 0.5
    return TEXT_VALUES[flag.key]


def config_value(cfg: TrainConfig, field: str):
    section, _, key = field.rpartition(".")
    if section == "adapter" and key in OPTION_NAMES:  # a family option sits in its family's nested options
        return getattr(cfg.adapter.options, OPTION_NAMES[key], default_of(field))
    for part in field.split("."):
        cfg = getattr(cfg, part)
    return cfg


def leaf_fields(cls=TrainConfig, prefix="") -> set[str]:
    """Every field of the config, sections included by their type (a section may default to None: decided later)."""
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = getattr(cls(), f.name)
        if sub is None:
            sub = next((t() for t in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(t)), None)
        out |= leaf_fields(type(sub), f"{prefix}{f.name}.") if dataclasses.is_dataclass(sub) else {prefix + f.name}
    return out


def test_readme_table_is_the_generated_one():
    text = (ROOT / "README.md").read_text()
    assert flags_table.with_table(text) == text, "run: python scripts/flags_table.py --write"
    assert all(f"`{f.name}`" in text or f"`--no-{f.name[2:]}`" in text for f in FLAGS)


def test_readme_without_markers_is_refused():
    with pytest.raises(QmorError, match="README.md needs one"):
        flags_table.with_table("no table here\n")


def test_every_config_field_has_one_flag_and_rows_are_well_formed():
    fields = [field for f in FLAGS for field in (f.field, *f.also)]
    assert len(fields) == len(set(fields)), "two flags set the same field"
    options = {f"adapter.{f.key}" for f in option_fields()}  # flat keys: AdapterConfig nests them by family
    assert set(fields) | FILE_ONLY == leaf_fields() | options, "a config field without a flag (or a flag without one)"
    names = [n for f in FLAGS for n in (f.name, *f.aliases)]
    assert len(names) == len(set(names)) and len(by_key()) == len(FLAGS)
    for f in FLAGS:
        assert f.group in GROUPS and f.shown_as in WIDGETS and f.help, f
        if f.auto:  # decided by the run: None in TrainConfig, shown as auto
            assert f.default is None and f.shown_default == f"auto: {f.auto}", f
            continue
        assert isinstance(f.default, f.kind) or f.kind is float and isinstance(f.default, int), f
        if f.choices and f.shown_as in ("dropdown", "radio"):
            assert f.default in f.choices, f
        if f.only_when:
            assert f.only_when[0] in by_key() and set(f.only_when[1]) <= set(by_key()[f.only_when[0]].choices), f
    assert by_key()["family"].choices == tuple(ADAPTERS)


def test_every_flag_parses_to_its_config_field():
    argv, expected = [], {}
    values = {f.key: other_value(f) for f in FLAGS}
    for f in FLAGS:
        value = values[f.key]
        argv += [f.name if value else f"--no-{f.name[2:]}"] if f.switch else [f.name, str(value)]
        for field in (f.field, *f.also) if f.applies(values) else ():  # another family's options are dropped
            expected[field] = f.to_config(value)
    cfg = finetune_4bit.build_config(finetune_4bit.parser().parse_args(argv))
    assert {field: config_value(cfg, field) for field in expected} == expected
    # and the other way round for the switches: each can be set back to its default
    back = [f.name if f.default else f"--no-{f.name[2:]}" for f in FLAGS if f.switch]
    cfg = finetune_4bit.build_config(finetune_4bit.parser().parse_args(back))
    assert all(config_value(cfg, f.field) == f.default for f in FLAGS if f.switch)


def test_parser_offers_exactly_the_table():
    offered = {s for a in finetune_4bit.parser()._actions for s in a.option_strings}
    table = {n for f in FLAGS for n in (f.name, *f.aliases)} | {f"--no-{f.name[2:]}" for f in FLAGS if f.switch}
    assert offered == table | {"-h", "--help", "--config", "--resume"}


def test_an_alias_sets_the_same_option():
    args = finetune_4bit.parser().parse_args(["--learning-rate", "0.25"])
    assert finetune_4bit.build_config(args).lr == 0.25


@pytest.mark.parametrize("init", ["loftq", "default"])
@pytest.mark.parametrize("family", list(ADAPTERS))
def test_app_command_round_trips_through_the_cli(family, init, tmp_path):
    """Every form value, changed from its default, reaches the same config through the command line the app
    builds; the options the family or init does not use are left out and stay at their defaults."""
    ws = make_workspace(tmp_path / "ws", restrict=False)
    shown = [f for f in FLAGS if f.in_app]
    values = {f.key: other_value(f) for f in shown} | {"family": family, "init": init, "run_name": "r"}
    args = command.train_args(ws, values)
    cfg = finetune_4bit.build_config(finetune_4bit.parser().parse_args(args))
    for f in shown:
        if f.auto and not f.applies(values):  # left out, so the run decides it (MoRA's alpha)
            continue
        want = f.to_config(values[f.key]) if f.applies(values) else f.default
        assert all(config_value(cfg, field) == want for field in (f.field, *f.also)), (f.key, args)
    assert cfg.output == str(ws.runs / "r")
    assert cfg.adapter.family == family and cfg.adapter.init == init
    assert ("--alpha" in args) == (family != "mora") and ("--top-k" in args) == (family == "sira")
    assert ("--loftq-iters" in args) == (init == "loftq")


def test_app_command_refuses_a_fraction_for_a_whole_number(tmp_path):
    ws = make_workspace(tmp_path / "ws", restrict=False)
    with pytest.raises(QmorError, match="Rank r must be a whole number, got 8.5"):
        command.train_args(ws, {"model": "tiny", "dataset": "uuid", "run_name": "r", "rank": 8.5})
    assert command.train_args(ws, {"model": "tiny", "dataset": "uuid", "run_name": "r", "rank": 8.0})[-1] == "8"


def test_form_fields_are_the_table_rows_shown_in_the_app():
    from apps import train_tab

    assert list(train_tab.FIELDS)[:2] == ["model", "run_name"]
    assert set(train_tab.FIELDS) == {f.key for f in FLAGS if f.in_app} | {"run_name"}
    assert all(train_tab.FIELDS[k] == by_key()[k].default for k in train_tab.FIELDS if k != "run_name")
    assert {f.key for f in train_tab.DEPENDENTS["family"]} == {
        "alpha", "mora_kind", "experts", "top_k", "capacity_factor", "expert_dropout", "aux_loss_weight"}
    assert [f.key for f in train_tab.DEPENDENTS["init"]] == ["loftq_iters", "calibration_samples"]


def test_the_untouched_form_leaves_what_depends_on_the_model_to_the_run(tmp_path):
    """The form starts every auto option empty (its radios at auto), and such an option stays out of the command, so
    the run decides it as the CLI's would: the demo's preset on tiny, a model's defaults on any other."""
    from apps import train_tab

    ws = make_workspace(tmp_path / "ws", restrict=False)
    radios = {f.key for f in FLAGS if f.auto and f.shown_as == "radio"}
    assert radios == {"family", "init"}
    form = train_tab._values(["auto" if k in radios else v for k, v in train_tab.FIELDS.items()])
    args = command.train_args(ws, {**form, "model": "smollm2", "dataset": "uuid", "run_name": "r"})
    auto = [f.name for f in FLAGS if f.auto]
    assert len(auto) == 10 and not set(auto) & set(args), args


def test_app_endpoint_names_its_parameters_and_uploads_only_what_training_reads(tmp_path):
    from apps.app import build
    from apps.jobs import Jobs
    from apps.train_tab import FIELDS
    from qmor.data.pipeline import FILE_TYPES

    ws = make_workspace(tmp_path / "ws", restrict=False)
    demo, _ = build(ws, Jobs(ws.root))
    params = demo.get_api_info()["named_endpoints"]["/start_training"]["parameters"]
    assert [p["parameter_name"] for p in params] == list(FIELDS)
    assert all(p["parameter_has_default"] for p in params)
    uploads = [b for b in demo.blocks.values() if type(b).__name__ == "File"]
    assert [u.file_types for u in uploads] == [list(FILE_TYPES)]
    assert set(FILE_TYPES) == {".jsonl", ".json", ".parquet", ".csv"}


def test_help_that_depends_on_a_family_reads_its_declaration(monkeypatch):
    # --rank and --alpha name the families whose declaration gives r another meaning, or leaves alpha unused
    rank, alpha = by_key()["rank"].help, by_key()["alpha"].help
    unscaled = alpha.partition("not used by ")[2].rstrip(")").split(", ")
    for name, spec in ADAPTERS.items():
        assert (f"{name}: {spec.rank_means}" in rank) == bool(spec.rank_means)
        assert (name in unscaled) == (not spec.scaled)
    monkeypatch.setitem(ADAPTERS, "mora", dataclasses.replace(ADAPTERS["mora"], rank_means=""))
    assert "mora" not in flags.rank_help()
