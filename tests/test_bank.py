import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import BANK_SPEC, assert_stacked
from rocket.adapters.bank import BankError, LoraBank, load_adapter
from rocket.tiny import make_random_adapter

Q0 = "model.layers.0.self_attn.q_proj"
UP1 = "model.layers.1.mlp.up_proj"


def test_loads_mixed_bank(lora_bank_dir, tiny_llama):
    bank = LoraBank.load(lora_bank_dir)
    assert bank.names == sorted(s[0] for s in BANK_SPEC)
    by_name = {s[0]: s for s in BANK_SPEC}
    for a in bank.adapters:
        _, r, alpha, targets, rslora = by_name[a.name]
        assert a.r == r and a.use_rslora == rslora
        assert a.scaling == pytest.approx(alpha / (r ** 0.5 if rslora else r))
        assert {m.rsplit(".", 1)[1] for m in a.modules} == set(targets)
        assert len(a.modules) == 2 * len(targets)  # two layers
    bank.validate(tiny_llama)
    assert set(bank.coverage()["qv_r4"]) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}


def test_weights_match_peft_file(lora_bank_dir):
    a = load_adapter(lora_bank_dir / "qv_r4")
    state = load_file(lora_bank_dir / "qv_r4" / "adapter_model.safetensors")
    assert torch.equal(a.weights[Q0][0], state[f"base_model.model.{Q0}.lora_A.weight"])
    assert torch.equal(a.weights[Q0][1], state[f"base_model.model.{Q0}.lora_B.weight"])


def test_stack_pads_ranks_and_zeroes_missing(lora_bank_dir):
    bank = LoraBank.load(lora_bank_dir)
    s = bank.stack(UP1)
    assert s.A.shape == (4, 16, 64) and s.B.shape == (4, 128, 16)
    assert_stacked(s, bank.adapters, UP1, torch.float32)
    for n, a in enumerate(bank.adapters):
        if UP1 in a.weights:  # padding keeps ΔW exact
            A, B = a.weights[UP1]
            assert torch.allclose(s.B[n] @ s.A[n], B @ A, atol=1e-6)
    half = bank.stack(UP1, indices=[3, 0], dtype=torch.bfloat16)
    assert_stacked(half, [bank.adapters[3], bank.adapters[0]], UP1, torch.bfloat16)


def test_manifest_in_seed_format(lora_bank_dir, tmp_path):
    manifest = tmp_path / "experts.txt"
    # the reference implementation's manifests list .../adapter_model.bin files; convert two adapters to .bin
    lines = []
    for name in ("all_r8", "qv_r4"):
        d = tmp_path / name
        shutil.copytree(lora_bank_dir / name, d)
        torch.save(load_file(d / "adapter_model.safetensors"), d / "adapter_model.bin")
        (d / "adapter_model.safetensors").unlink()
        lines.append(str(d / "adapter_model.bin"))
    manifest.write_text("# experts\n" + "\n".join(lines) + "\n\n")
    bank = LoraBank.load(manifest)
    assert bank.names == ["all_r8", "qv_r4"]
    ref = load_adapter(lora_bank_dir / "qv_r4")
    assert torch.equal(bank["qv_r4"].weights[Q0][0], ref.weights[Q0][0])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_refuses_pickle_that_executes_code(lora_bank_dir, tmp_path):
    d = tmp_path / "evil"
    shutil.copytree(lora_bank_dir / "qv_r4", d)
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    state = dict(load_file(lora_bank_dir / "qv_r4" / "adapter_model.safetensors"))
    state["payload"] = _Exploit(str(marker))
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump(state, f)
    with pytest.raises(BankError, match="refused: this pickle needs code execution"):
        load_adapter(d)
    assert not marker.exists()
    with open(d / "adapter_model.bin", "rb") as f:  # the planted file really executes code when unpickled
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: (d / "adapter_config.json").unlink(), "missing adapter_config.json"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors or adapter_model.bin"),
    (lambda d: (d / "adapter_config.json").write_text("{bad"), "malformed JSON"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 1})),
     "field 'r' must be a positive number"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"garbage!"), "unreadable safetensors"),
])
def test_bad_adapter_dirs(lora_bank_dir, tmp_path, mutate, message):
    d = tmp_path / "x"
    shutil.copytree(lora_bank_dir / "qv_r4", d)
    mutate(d)
    with pytest.raises(BankError, match=message):
        load_adapter(d)


def test_validate_names_adapter_and_module(tiny_tokenizer, tmp_path, lora_bank_dir):
    from rocket.tiny import build_llama
    other = build_llama(tiny_tokenizer, hidden=32, intermediate=64)
    bank = LoraBank.load(lora_bank_dir)
    with pytest.raises(BankError, match=r"adapter 'all_r8': module 'model\.layers\.0\.mlp\.down_proj' is 128→64 "
                                        r"but the base model's layer is 64→32"):
        bank.validate(other)
    small = build_llama(tiny_tokenizer, layers=1)
    with pytest.raises(BankError, match="model.layers.1.* is not in the base model"):
        bank.validate(small)


def test_bank_errors(tmp_path, lora_bank_dir):
    with pytest.raises(BankError, match="no adapter directories"):
        LoraBank.load(tmp_path)
    m = tmp_path / "m.txt"
    m.write_text(str(lora_bank_dir / "qv_r4") + "\nmissing/dir\n")
    with pytest.raises(BankError, match=r"m\.txt:2: missing/dir does not exist"):
        LoraBank.load(m)
    with pytest.raises(KeyError, match="'zzz' is not in the bank"):
        LoraBank.load(lora_bank_dir)["zzz"]


def test_alpha_pattern_and_layers(tiny_llama, tmp_path):
    d = make_random_adapter(tiny_llama, tmp_path / "p", r=4, alpha=8, target_modules=("q_proj",), layers=[1])
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj": 32}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    a = load_adapter(d)
    assert a.modules == ["model.layers.1.self_attn.q_proj"]
    assert a.scalings["model.layers.1.self_attn.q_proj"] == pytest.approx(8.0)


def _copy_adapter(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("poison, message", [
    (float("nan"), "lora_B has non-finite values"), (float("inf"), "lora_B has non-finite values")])
def test_non_finite_weights_are_refused_naming_adapter_and_module(lora_bank_dir, tmp_path, poison, message):
    from safetensors.torch import save_file
    ad = _copy_adapter(lora_bank_dir / "qv_r4", tmp_path / "bad")
    state = load_file(ad / "adapter_model.safetensors")
    key = f"base_model.model.{Q0}.lora_B.weight"
    state[key][0, 0] = poison
    save_file(state, str(ad / "adapter_model.safetensors"))
    with pytest.raises(BankError, match=f"^adapter 'bad': module '{Q0}' {message}"):
        load_adapter(ad)


def test_integer_weights_are_refused(lora_bank_dir, tmp_path):
    from safetensors.torch import save_file
    ad = _copy_adapter(lora_bank_dir / "qv_r4", tmp_path / "ints")
    state = {k: (v * 100).to(torch.int32) for k, v in load_file(ad / "adapter_model.safetensors").items()}
    save_file(state, str(ad / "adapter_model.safetensors"))
    with pytest.raises(BankError, match="torch.int32, not a floating-point tensor"):
        load_adapter(ad)


@pytest.mark.parametrize("config, message", [
    ("[1, 2]", "expected a JSON object, got a list"),
    ('{"r": NaN, "lora_alpha": 16}', "field 'r' must be a positive number, got nan"),
    ('{"r": true, "lora_alpha": 16}', "field 'r' must be a positive number, got True"),
])
def test_adapter_configs_that_are_not_usable_give_one_line(lora_bank_dir, tmp_path, config, message):
    ad = _copy_adapter(lora_bank_dir / "qv_r4", tmp_path / "cfg")
    (ad / "adapter_config.json").write_text(config)
    with pytest.raises(BankError, match=message):
        load_adapter(ad)


def test_byte_order_marks_accepted_and_other_encodings_named(lora_bank_dir, tmp_path):
    ad = _copy_adapter(lora_bank_dir / "qv_r4", tmp_path / "bom")
    cfg = (ad / "adapter_config.json").read_bytes()
    (ad / "adapter_config.json").write_bytes(b"\xef\xbb\xbf" + cfg)
    assert load_adapter(ad).r == 4
    manifest = tmp_path / "m.txt"
    manifest.write_bytes(b"\xef\xbb\xbf" + str(ad).encode() + b"\n")
    assert LoraBank.load(manifest).names == ["bom"]
    manifest.write_bytes(str(ad).encode() + b"\n# caf\xe9\n")
    with pytest.raises(BankError, match=r"m.txt:2: not UTF-8 text"):
        LoraBank.load(manifest)


def test_directories_without_a_config_are_named_when_skipped(lora_bank_dir, tmp_path):
    bank_dir = tmp_path / "bank"
    _copy_adapter(lora_bank_dir / "qv_r4", bank_dir / "qv_r4")
    (bank_dir / "half_copied").mkdir()
    with pytest.warns(UserWarning, match="1 directory without adapter_config.json skipped: half_copied"):
        assert LoraBank.load(bank_dir).names == ["qv_r4"]
