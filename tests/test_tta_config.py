"""TTTConfig validation and presets."""

import argparse

import pytest

from yolozu.tta import TTTConfig
from yolozu.tta.presets import PRESETS, preset_values


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("lr", 0.0, "> 0"),
        ("lr", float("nan"), "finite"),
        ("steps", 0, ">= 1"),
        ("steps", 1.5, "integer"),
        ("batch_size", -2, ">= 1"),
        ("max_batches", 0, ">= 1 or None"),
        ("mim_mask_prob", 1.2, "<= 1"),
        ("mim_patch_size", 0, ">= 1"),
        ("method", "sgd", "one of tent, mim, cotta, eata, sar"),
        ("update_filter", "bias", "one of all, norm_only"),
        ("reset", "never", "one of stream, sample"),
        ("schedule", "later", "one of pre, online"),
        ("max_update_norm", -1.0, ">= 0 or None"),
        ("max_loss_increase", -0.1, ">= 0 or None"),
        ("cotta_ema_momentum", 1.5, "<= 1"),
        ("cotta_augmentations", ("identity", "rotate"), "drawn from identity, hflip"),
        ("cotta_aggregation", "median", "one of confidence_weighted_mean, mean"),
        ("seed", -1, ">= 0"),
        ("bn_mode", "frozen", "one of running, batch, eval"),
    ],
)
def test_bad_values_name_the_field_and_range(field, value, expected):
    with pytest.raises(ValueError, match=rf"TTTConfig\.{field} must be .*{expected}"):
        TTTConfig(**{field: value})


def test_defaults_follow_the_spec():
    c = TTTConfig()
    assert (c.enabled, c.method, c.steps, c.lr, c.batch_size, c.max_batches, c.update_filter) == (
        False,
        "tent",
        1,
        1e-4,
        1,
        1,
        "all",
    )
    assert (c.seed, c.include, c.exclude, c.log_out) == (None, None, None, None)
    assert (c.reset, c.schedule, c.stop_on_non_finite, c.rollback_on_stop) == ("stream", "pre", True, True)


@pytest.mark.parametrize(
    "name,method,filt,cap",
    [
        ("safe", "tent", "norm_only", 1.0),
        ("adapter_only", "tent", "adapter_only", 5.0),
        ("mim_safe", "mim", "adapter_only", 5.0),
        ("cotta_safe", "cotta", "lora_norm_only", 1.0),
        ("eata_safe", "eata", "lora_norm_only", 1.0),
        ("sar_safe", "sar", "lora_only", 1.0),
    ],
)
def test_presets(name, method, filt, cap):
    c = TTTConfig.from_preset(name)
    assert (c.preset, c.enabled, c.method, c.update_filter) == (name, True, method, filt)
    assert (c.steps, c.batch_size, c.lr, c.max_batches) == (1, 1, 1e-4, 1)
    assert c.max_grad_norm == c.max_update_norm == c.max_total_update_norm == cap
    assert c.max_loss_ratio == 3.0


def test_explicit_values_win_over_the_preset():
    c = TTTConfig.from_preset("safe", lr=1e-3, max_update_norm=2.0, update_filter="all")
    assert (c.lr, c.max_update_norm, c.update_filter, c.max_total_update_norm) == (1e-3, 2.0, "all", 1.0)


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="unknown TTT preset 'fast'"):
        preset_values("fast")
    assert set(PRESETS) == {
        "safe", "adapter_only", "mim_safe", "cotta_safe", "eata_safe", "sar_safe", "detector_response_safe",
        "pose_safe", "keypoints_safe", "depth_safe", "seg_safe", "pose_mim", "eata_paper", "cotta_paper",
    }  # fmt: skip


def test_to_dict_is_json_ready():
    import json

    d = TTTConfig(include=["bn"], exclude="head").to_dict()
    assert d["include"] == ["bn"] and d["exclude"] == ["head"]
    json.dumps(d)


def test_every_setting_is_one_generated_flag_with_its_help_and_choices():
    import attrs

    from yolozu.cli.export import build_parser, flag_of
    from yolozu.tta.cli_options import add_ttt_arguments

    actions = {a.dest: a for a in build_parser()._actions}
    flags = [f for f in attrs.fields(TTTConfig) if f.name not in ("enabled", "preset")]
    assert len(flags) > 30
    for field in flags:
        action = actions.pop(field.metadata.get("flag", "--ttt-" + field.name).lstrip("-").replace("-", "_"))
        assert action.option_strings[0] == flag_of(field)
        assert field.metadata["help"] in action.help and action.default is None
        assert (tuple(action.choices) if action.choices else None) == getattr(field.validator, "choices", None)
    assert {dest for dest in actions if dest.startswith("ttt_")} == {"ttt_preset"}
    assert flag_of(attrs.fields_dict(TTTConfig)["mim_mask_prob"]) == "--ttt-mask-prob"  # the spec's MIM flags
    parser = argparse.ArgumentParser()
    add_ttt_arguments(parser)
    parsed = parser.parse_args(["--ttt", "--ttt-mask-prob", "0.3", "--ttt-patch-size", "8"])
    assert (parsed.ttt_mask_prob, parsed.ttt_patch_size) == (0.3, 8)  # under YOLOZU's names


def test_flags_parse_into_the_config_and_meta_groups_each_methods_settings():
    from yolozu.cli.export import build_parser, ttt_config, ttt_meta
    from yolozu.functional.methods.cotta import CoTTASettings

    argv = ["--dataset", "d", "--output", "o", "--ttt", "--ttt-method", "cotta", "--ttt-cotta-augmentations",
            "identity", "--ttt-cotta-augmentations", "hflip", "--ttt-include", "bn", "lora", "--ttt-max-batches", "3",
            "--no-ttt-rollback-on-stop", "--ttt-mask-prob", "0.25", "--ttt-cotta-restore-prob", "0.5"]
    config = ttt_config(build_parser().parse_args(argv))
    assert config.cotta_augmentations == ("identity", "hflip") and config.include == ("bn", "lora")
    assert (config.max_batches, config.rollback_on_stop, config.mim_mask_prob) == (3, False, 0.25)
    assert config.method_settings() == CoTTASettings(restore_prob=0.5)
    meta = ttt_meta(config, None)
    assert meta["cotta"]["restore_prob"] == 0.5 and meta["cotta"]["augmentations"] == ["identity", "hflip"]
    assert meta["mim"] == {"mask_prob": 0.25, "patch_size": 16, "mask_value": 0.0, "norm_pix_loss": False,
                           "error_quantile": None, "reference_data": None}
    assert (meta["max_batches"], meta["prediction_bn"], meta["report"]) == (3, "batch", None)
    assert "cotta_restore_prob" not in meta and "mim_mask_prob" not in meta


def test_enabled_and_switches_accept_only_booleans():
    with pytest.raises(ValueError, match="TTTConfig.enabled must be True or False, got 'no'"):
        TTTConfig(enabled="no")
    with pytest.raises(ValueError, match="TTTConfig.rollback_on_stop must be True or False"):
        TTTConfig(rollback_on_stop=1)
