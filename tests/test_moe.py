"""LoraMoELinear, inject_lora_moe and MoE save/load (rocket/moe.py)."""
import copy

import pytest
import torch
from torch import nn

from tests.helpers import rel_err
from rocket.adapters.bank import LoraBank
from rocket.kernels import reference
from rocket.errors import MoEError
from rocket.moe.layer import LoraMoELinear
from rocket.moe.inject import inject_lora_moe, moe_aux_loss, moe_layers, set_train_router_only
from rocket.moe.state import load_moe, load_moe_state, moe_state_dict, read_moe_state, save_moe, save_moe_state
from rocket.resume import model_fingerprint
from rocket.tiny import build_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(d_in, d_out, E, r, top_k, gen, **kw):
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5)
        base.bias.copy_(torch.randn(d_out, generator=gen))
    A = torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5
    B = torch.randn(E, d_out, r, generator=gen)
    s = torch.rand(E, generator=gen) + 0.5
    return LoraMoELinear(base, A, B, s, top_k, router_std=1.0, seed=int(torch.randint(0, 99, (1,), generator=gen)),
                         **kw).to(DEVICE)


def test_layer_is_a_drop_in_linear_and_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    layer = _layer(37, 29, 5, 6, 2, gen)
    x = torch.randn(3, 7, 37, generator=gen).to(DEVICE)
    y = layer(x)
    assert y.shape == (3, 7, 29) and layer.in_features == 37 and layer.out_features == 29
    want = reference.lora_moe(x.double(), layer.base.weight.double(), layer.base.bias.double(), layer.lora_A.double(),
                      layer.lora_B.double(), layer.scaling.double(), layer.router.weight.double(), 2)
    assert rel_err(y, want) < 1e-5
    assert not any(p.requires_grad for p in layer.base.parameters())
    names = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert names == {"lora_A", "lora_B", "router.weight"}
    assert layer.aux_loss is None


def test_layer_passes_its_gemm_backend_to_the_fused_layer():
    gen = torch.Generator().manual_seed(10)
    layer = _layer(24, 20, 3, 4, 2, gen, gemm_backend="triton")
    x = torch.randn(11, 24, generator=gen).to(DEVICE)
    want = reference.lora_moe(x.double(), layer.base.weight.double(), layer.base.bias.double(), layer.lora_A.double(),
                      layer.lora_B.double(), layer.scaling.double(), layer.router.weight.double(), 2)
    assert rel_err(layer(x), want) < 1e-5
    layer.gemm_backend = "no_such"
    with pytest.raises(ValueError, match="^lora_moe: gemm_backend='no_such'"):
        layer(x)


def test_bf16_layer_with_float32_masters_as_the_trainer_keeps_them():
    """TorchEngine keeps float32 masters in a bf16 model: the layer rounds them in its kernels and
    their gradients arrive in float32, equal to rounding first (bf16 tolerance)."""
    gen = torch.Generator().manual_seed(5)
    layer = _layer(40, 28, 4, 6, 2, gen).to(torch.bfloat16)
    for p in (layer.lora_A, layer.lora_B, layer.router.weight):
        p.data = p.data.float()
    x = torch.randn(2, 19, 40, generator=gen).to(DEVICE).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(2, 19, 28, generator=gen).to(DEVICE)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(gy.to(torch.bfloat16))
    leaves = [t.detach().to(torch.bfloat16).double().requires_grad_()
              for t in (x, layer.lora_A, layer.lora_B, layer.router.weight)]
    want = reference.lora_moe(leaves[0], layer.base.weight.double(), layer.base.bias.double(), leaves[1], leaves[2],
                      layer.scaling.double(), leaves[3], 2)
    want.backward(gy.to(torch.bfloat16).double())
    assert rel_err(y, want) < 2e-2
    for got, ref in zip((x, layer.lora_A, layer.lora_B, layer.router.weight), leaves):
        assert got.grad.dtype == got.dtype and rel_err(got.grad, ref.grad) < 2e-2


@pytest.mark.gpu
def test_gpu_layer_under_make_graphed_callables_trains_like_the_eager_layer():
    """torch.cuda.make_graphed_callables captures the bf16 layer (float32 masters) forward and backward;
    on fresh inputs copied in, its output and every gradient (input, experts, router) equal the eager
    layer's."""
    gen = torch.Generator().manual_seed(8)
    eager = _layer(1024, 768, 4, 16, 2, gen).to(torch.bfloat16)
    for p in (eager.lora_A, eager.lora_B, eager.router.weight):
        p.data = p.data.float()
    layer = copy.deepcopy(eager)
    sample = torch.randn(700, 1024, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    graphed = torch.cuda.make_graphed_callables(layer, (sample,))
    for _ in range(2):
        x = torch.randn(700, 1024, generator=gen).to(DEVICE, torch.bfloat16)
        gy = torch.randn(700, 768, generator=gen).to(DEVICE, torch.bfloat16)
        outs = []
        for module in (graphed, eager):
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(gy)
            outs.append([y.detach(), xi.grad] + [p.grad.clone() for p in (module.lora_A, module.lora_B,
                                                                            module.router.weight)])
            module.zero_grad(set_to_none=True)
        for name, g, e in zip(["y", "dx", "dA", "dB", "dG"], *outs):
            assert rel_err(g, e) < 1e-3, name


@pytest.mark.gpu
def test_gpu_layer_inside_torch_compile_matches_the_eager_layer():
    """A model around the layer compiled with torch.compile (the layer's kernels run as they are,
    the rest is compiled) gives the eager output and gradients; the graph breaks only where the
    layer is called, never inside its kernel launches."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    gen = torch.Generator().manual_seed(9)
    eager = nn.Sequential(_layer(512, 384, 4, 8, 2, gen), nn.GELU(), nn.Linear(384, 256)).to(DEVICE, torch.bfloat16)
    inner = copy.deepcopy(eager)
    compiled = torch.compile(inner)
    x = torch.randn(2, 150, 512, generator=gen).to(DEVICE, torch.bfloat16)
    outs = []
    for model, layer in ((compiled, inner[0]), (eager, eager[0])):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.float().square().mean().backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in (layer.lora_A, layer.lora_B, layer.router.weight)])
    for name, g, e in zip(["y", "dx", "dA", "dB", "dG"], *outs):
        assert rel_err(g, e) < 2e-2, name
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("torch.compiler.disable" in reason for reason in breaks), list(breaks)


def test_every_trainable_tensor_changes_after_an_optimizer_step():
    gen = torch.Generator().manual_seed(1)
    layer = _layer(24, 18, 4, 5, 2, gen)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    layer(torch.randn(40, 24, generator=gen).to(DEVICE)).square().mean().backward()
    opt.step()
    for n, p in layer.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in ("lora_A", "lora_B", "router.weight")), n


@pytest.mark.parametrize("top_k", [1, 2])
def test_train_router_only_freezes_experts(top_k):
    gen = torch.Generator().manual_seed(2)
    layer = _layer(16, 12, 3, 4, top_k, gen, train_router_only=True)
    layer(torch.randn(9, 16, generator=gen).to(DEVICE)).sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    layer.set_train_router_only(False)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


@pytest.mark.parametrize("top_k", [1, 2, 5])
def test_the_router_learns_from_the_output_for_every_top_k(top_k):
    """The output alone (no balancing loss) gives the router a gradient, k = 1 included: there the
    expert's output is scaled by its probability (Switch), where a renormalised weight would be 1.
    The fused layer and the reference both, against the float64 reference."""
    gen = torch.Generator().manual_seed(20 + top_k)
    layer = _layer(23, 13, 5, 3, top_k, gen)
    x = torch.randn(31, 23, generator=gen).to(DEVICE)
    gy = torch.randn(31, 13, generator=gen).to(DEVICE)
    layer(x).backward(gy)
    frozen = [t.detach() for t in (x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B, layer.scaling)]
    G64, G32 = (layer.router.weight.detach().to(dt).requires_grad_() for dt in (torch.float64, torch.float32))
    reference.lora_moe(*[t.double() for t in frozen], G64, top_k).backward(gy.double())
    reference.lora_moe(*frozen, G32, top_k).backward(gy)  # the CPU path of a float32 model
    assert G64.grad.abs().max() > 1e-3
    for got in (layer.router.weight.grad, G32.grad):
        assert rel_err(got, G64.grad) < 1e-5


def test_load_balancing_loss_matches_reference_and_reaches_the_router():
    gen = torch.Generator().manual_seed(3)
    layer = _layer(20, 10, 6, 3, 2, gen, load_balancing=True)
    x = torch.randn(50, 20, generator=gen).to(DEVICE)
    layer(x)
    _, experts, probs = reference.route_topk(x.double(), layer.router.weight.double(), 2)
    want = reference.load_balancing_loss(probs, experts, 6)
    assert abs(layer.aux_loss.item() - want.item()) < 1e-5
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["top_k", "shape", "scaling", "base"])
def test_bad_layer_arguments_are_one_line_errors(bad):
    base = nn.Linear(8, 6)
    A, B, s, k = torch.randn(3, 2, 8), torch.randn(3, 6, 2), torch.ones(3), 2
    if bad == "top_k":
        k = 4
    elif bad == "shape":
        B = torch.randn(3, 5, 2)
    elif bad == "scaling":
        s = torch.ones(2)
    else:
        base = nn.Conv1d(8, 6, 1)
    with pytest.raises(MoEError, match="LoraMoELinear"):
        LoraMoELinear(base, A, B, s, k)


# --------------------------------------------------------------------------- injection into a tiny Llama
def _ids(model, gen, batch=2, length=11):
    return torch.randint(3, model.config.vocab_size, (batch, length), generator=gen)


def test_duplicated_adapter_equals_peft_with_that_adapter(tiny_llama, lora_bank_dir):
    """Whatever the router does, experts that are all one adapter sum to that adapter's delta."""
    from peft import PeftModel
    gen = torch.Generator().manual_seed(4)
    ids = _ids(tiny_llama, gen)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(lora_bank_dir / "all_r8")).eval()
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        base = tiny_llama(input_ids=ids).logits
    bank = LoraBank.load(lora_bank_dir)
    model = inject_lora_moe(tiny_llama, bank, ["all_r8", "all_r8", "all_r8"], top_k=2, router_std=1.0).eval()
    assert len(moe_layers(model)) == 14  # 2 layers × 7 projections
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert rel_err(got - base, want - base) < 1e-4  # the LoRA effect itself, not just the logits
    assert rel_err(got, want) < 1e-6


def _peft_fresh_lora_A(model, module: str, r: int) -> torch.Tensor:
    """lora_A of a fresh peft LoRA (peft's default init) of rank r on `module` of `model`."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)  # peft draws from the global generator
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=[module]))
    return next(p for n, p in peft_model.named_parameters() if "lora_A" in n).detach()


def test_mixed_ranks_and_missing_modules_give_fresh_peft_initialised_experts(tiny_llama, lora_bank_dir, caplog):
    """Where an expert's adapter lacks a module, its expert there starts as peft starts a fresh LoRA:
    A kaiming-uniform (peft's bound and spread), B = 0, the adapter's rank and scaling, the layer's
    ranks zero-padded to the largest; seeded by `seed`; one warning names adapters and modules."""
    bank = LoraBank.load(lora_bank_dir)
    peft_A = _peft_fresh_lora_A(tiny_llama, "q_proj", 16)
    with caplog.at_level("WARNING", logger="rocket.moe"):
        model = inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4", "mlp_r16"], top_k=1, seed=3)
    layers = moe_layers(model)
    q, gate = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.mlp.gate_proj"]
    assert q.lora_A.shape == (2, 16, 64) and gate.lora_A.shape == (2, 16, 64)
    assert q.scaling.tolist() == [2.0, 0.5] and gate.scaling.tolist() == [2.0, 0.5]  # 8/4 and 8/16
    assert torch.equal(q.lora_A[0, :4], bank["qv_r4"].weights["model.layers.0.self_attn.q_proj"][0])
    assert torch.equal(gate.lora_A[1], bank["mlp_r16"].weights["model.layers.1.mlp.gate_proj"][0])
    assert q.lora_A[0, 4:].abs().sum() == 0 and q.lora_B[0, :, 4:].abs().sum() == 0  # rank padding
    assert q.lora_B[1].abs().sum() == 0 and gate.lora_B[0].abs().sum() == 0          # fresh B = 0
    assert gate.lora_A[0, 4:].abs().sum() == 0                                       # fresh rank 4, padded
    bound = 1 / 64 ** 0.5  # kaiming-uniform with a = √5 on [r, d_in]: U(−1/√d_in, 1/√d_in)
    for fresh in (q.lora_A[1], gate.lora_A[0, :4], peft_A):
        assert fresh.abs().max() <= bound and fresh.abs().max() > 0.9 * bound
        assert abs(fresh.std().item() - peft_A.std().item()) < 0.15 * peft_A.std().item()
    assert not torch.equal(q.lora_A[1], layers["model.layers.0.self_attn.v_proj"].lora_A[1])  # per layer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rpartition(".")[2] in ("lora_A", "lora_B") or n.endswith("router.weight")
                             for n in trainable)
    assert model.rocket_moe_config["experts"] == ["qv_r4", "mlp_r16"]
    warnings = [r for r in caplog.records if r.name == "rocket.moe"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    msg = warnings[0].getMessage()
    assert "'qv_r4' lacks 6 (" in msg and "'mlp_r16' lacks 4 (" in msg
    assert "model.layers.1.mlp.gate_proj" in msg and "model.layers.0.self_attn.q_proj" in msg

    same = moe_state_dict(inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4", "mlp_r16"], top_k=1, seed=3))
    other = moe_state_dict(inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4", "mlp_r16"], top_k=1, seed=4))
    key = "model.layers.0.self_attn.q_proj.lora_A"
    assert torch.equal(same[key], moe_state_dict(model)[key]) and not torch.equal(other[key][1], same[key][1])


def test_fresh_experts_take_the_adapters_rank_and_alpha_patterns_and_rslora(tiny_llama, lora_bank_dir, tmp_path):
    import json
    import shutil
    bank_dir = tmp_path / "bank"
    for name in ("qv_r4", "attn_r2_rs", "mlp_r16"):
        shutil.copytree(lora_bank_dir / name, bank_dir / name)
    cfg_file = bank_dir / "qv_r4" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"rank_pattern": {"up_proj": 6}, "alpha_pattern": {"up_proj": 3}}))
    bank = LoraBank.load(bank_dir)
    layers = moe_layers(inject_lora_moe(tiny_llama, bank, ["qv_r4", "attn_r2_rs", "mlp_r16"], top_k=2))
    up, gate = layers["model.layers.0.mlp.up_proj"], layers["model.layers.0.mlp.gate_proj"]
    assert up.scaling[0].item() == pytest.approx(3 / 6) and gate.scaling[0].item() == pytest.approx(8 / 4)
    assert up.scaling[1].item() == pytest.approx(4 / 2 ** 0.5)  # rsLoRA: alpha/√r
    assert (up.lora_A[0, :6].abs().amin(dim=1) > 0).all() and up.lora_A[0, 6:].abs().sum() == 0
    assert (up.lora_A[1, :2].abs().amin(dim=1) > 0).all() and up.lora_A[1, 2:].abs().sum() == 0


def test_fresh_experts_change_nothing_at_first_then_learn(tiny_llama, lora_bank_dir):
    """B = 0: at initialisation the model is the base + the covered experts (routing included);
    then the fresh experts receive non-zero gradients and their weights move."""
    gen = torch.Generator().manual_seed(11)
    bank = LoraBank.load(lora_bank_dir)
    ids = _ids(tiny_llama, gen)
    with torch.no_grad():
        base = tiny_llama(input_ids=ids).logits
    model = inject_lora_moe(tiny_llama, bank, ["qv_r4", "mlp_r16", "all_r8"], top_k=2, router_std=1.0)
    fresh = {name: [e for e, a in enumerate(["qv_r4", "mlp_r16", "all_r8"]) if name not in bank[a].weights]
             for name in moe_layers(model)}
    assert sum(map(len, fresh.values())) == 10 + 8  # qv_r4 lacks 10 of the 14 modules, mlp_r16 8
    covered_only = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in moe_layers(covered_only).items():
            for e in fresh[name]:
                layer.lora_A[e].zero_()
                layer.scaling[e] = 0.0
        want = covered_only(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert rel_err(got, want) < 1e-6 and rel_err(got, base) > 1e-3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for step in range(2):  # B first (A's gradient is B-shaped, 0 while B = 0), then A too
        opt.zero_grad()
        model(input_ids=ids).logits.square().mean().backward()
        for name, layer in moe_layers(model).items():
            for e in fresh[name]:
                assert layer.lora_B.grad[e].abs().max() > 0, (name, e)
                assert (layer.lora_A.grad[e].abs().max() > 0) == (step == 1), (name, e)
        opt.step()
    for name, layer in moe_layers(model).items():
        for e in fresh[name]:
            assert not torch.equal(layer.lora_B[e], before[f"{name}.lora_B"][e]), (name, e)
            assert not torch.equal(layer.lora_A[e], before[f"{name}.lora_A"][e]), (name, e)


def test_target_modules_and_bad_injections(tiny_llama, lora_bank_dir):
    bank = LoraBank.load(lora_bank_dir)
    with pytest.raises(MoEError, match="no_such"):
        inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["no_such"])
    with pytest.raises(MoEError, match="top_k"):
        inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4"], top_k=2)
    with pytest.raises(MoEError, match="k_proj"):
        inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4"], target_modules=["k_proj"], top_k=1)
    model = inject_lora_moe(tiny_llama, bank, [0, 1], target_modules=["q_proj"], top_k=1)
    assert sorted(moe_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(MoEError, match="already"):
        inject_lora_moe(model, bank, [0, 1], top_k=1)


def test_save_and_load_round_trip_into_a_plain_and_an_injected_model(tiny_llama, lora_bank_dir, tmp_path):
    gen = torch.Generator().manual_seed(5)
    bank = LoraBank.load(lora_bank_dir)
    plain, plain2 = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    model = inject_lora_moe(tiny_llama, bank, ["all_r8", "attn_r2_rs", "mlp_r16"], top_k=2, router_std=0.5)
    with torch.no_grad():  # make the state differ from a fresh injection
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    path = save_moe_state(model, tmp_path / "moe.safetensors")
    tensors, cfg = read_moe_state(path)
    assert set(tensors) == set(moe_state_dict(model)) and cfg["top_k"] == 2 and cfg["n_experts"] == 3
    assert not any("base" in k for k in tensors)
    ids = _ids(model, gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = load_moe_state(plain, path)
        assert rel_err(loaded(input_ids=ids).logits, want) == 0
    gate = "model.layers.1.mlp.gate_proj"  # attn_r2_rs (expert 1) lacks it: a fresh expert, trained here
    assert tensors[f"{gate}.scaling"][1].item() == pytest.approx(4 / 2 ** 0.5)
    assert tensors[f"{gate}.lora_A"][1, :2].abs().min() > 0 and tensors[f"{gate}.lora_B"][1, :, :2].abs().min() > 0
    for k, v in moe_state_dict(loaded).items():
        assert torch.equal(v, tensors[k]), k
    other = load_moe_state(inject_lora_moe(plain2, bank, ["all_r8", "attn_r2_rs", "mlp_r16"],
                                           top_k=2), path)
    for k, v in moe_state_dict(other).items():
        assert torch.equal(v, tensors[k]), k


def test_load_refuses_mismatched_and_foreign_files(tiny_llama, lora_bank_dir, tmp_path):
    from safetensors.torch import save_file
    bank = LoraBank.load(lora_bank_dir)
    path = save_moe_state(inject_lora_moe(copy.deepcopy(tiny_llama), bank, ["qv_r4", "all_r8"], top_k=1),
                          tmp_path / "a.safetensors")
    other = inject_lora_moe(tiny_llama, bank, ["qv_r4", "all_r8"], target_modules=["q_proj"], top_k=1)
    before = {k: v.clone() for k, v in moe_state_dict(other).items()}
    with pytest.raises(MoEError, match="differ"):
        load_moe_state(other, path)
    assert all(torch.equal(v, before[k]) for k, v in moe_state_dict(other).items())
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(MoEError, match="not a rocket MoE state"):
        load_moe_state(other, tmp_path / "foreign.safetensors")


def test_base_fingerprint_is_the_same_in_every_load_dtype_and_sees_changes(tiny_llama):
    fp = model_fingerprint(tiny_llama)
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    assert model_fingerprint(half) == fp                                  # float32 weights loaded in bfloat16
    assert model_fingerprint(copy.deepcopy(half).to(torch.float16)) == fp  # bfloat16 weights loaded in float16
    with torch.no_grad():
        half.model.layers[0].self_attn.o_proj.weight[0, 0] += 0.05  # element 0 of every parameter is sampled
    assert model_fingerprint(half) == {**fp, "samples": model_fingerprint(half)["samples"]} != fp
    tiny_llama.config.rope_parameters = {"rope_theta": 5e5, "rope_type": "default"}
    assert model_fingerprint(tiny_llama) == {**fp, "config": model_fingerprint(tiny_llama)["config"]} != fp


def test_save_moe_writes_a_directory_that_load_moe_checks_against_its_base(tiny_llama, tiny_tokenizer,
                                                                           lora_bank_dir, tmp_path):
    gen = torch.Generator().manual_seed(8)
    base = copy.deepcopy(tiny_llama)
    model = inject_lora_moe(tiny_llama, LoraBank.load(lora_bank_dir), ["qv_r4", "mlp_r16"], top_k=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    out = save_moe(model, tmp_path / "moe", tokenizer=tiny_tokenizer)
    assert {"moe.safetensors", "rocket_moe_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ids = _ids(model, gen)
    with torch.no_grad():
        assert rel_err(load_moe(copy.deepcopy(base), out, device="cpu")(input_ids=ids).logits,
                       model(input_ids=ids).logits) == 0
    deeper = build_llama(tiny_tokenizer, layers=3, seed=1234)
    with pytest.raises(MoEError, match=r"^\S+/moe: trained on base model an in-memory model but given an in-memory "
                                       r"model, which differs in config\.json, parameter names or shapes, weights; "
                                       r"pass force_base=True \(--force-base\) to load it anyway$"):
        load_moe(deeper, out, device="cpu")


def test_set_train_router_only_and_aux_loss_over_the_model(tiny_llama, lora_bank_dir):
    bank = LoraBank.load(lora_bank_dir)
    model = inject_lora_moe(tiny_llama, bank, ["all_r8", "mlp_r16"], top_k=1, load_balancing=True)
    set_train_router_only(model)
    assert {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad} == {"weight"}
    model(input_ids=_ids(model, torch.Generator().manual_seed(6)))
    aux = moe_aux_loss(model)
    assert aux is not None and 1.0 <= float(aux) <= 2.0  # E·Σf·P for E=2, k=1 lies in [1, 2]
