"""sd_lora.lora: the math of one layer, checked against the formula written out by hand."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd_lora.lora import Blend, LoRALayer


def _adapters(base, specs, seed=0):
    """specs: list of (name, rank, alpha). Returns {name: (down, up, alpha)} with random tensors fitting `base`."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, r, a in specs:
        if isinstance(base, nn.Conv2d):
            down = torch.randn(r, base.in_channels, *base.kernel_size, generator=g) * 0.3
            up = torch.randn(base.out_channels, r, 1, 1, generator=g)
        else:
            down = torch.randn(r, base.in_features, generator=g) * 0.3
            up = torch.randn(base.out_features, r, generator=g)
        out[name] = (down, up, a)
    return out


def _reference(base, x, adapters, weights):
    """base(x) + sum_i w_i (alpha_i/r_i) up_i(down_i(x)), computed the slow obvious way."""
    y = base(x)
    for name, (down, up, alpha) in adapters.items():
        s = weights.get(name, 0.0) * alpha / down.shape[0]
        if isinstance(base, nn.Conv2d):
            h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)
            y = y + s * F.conv2d(h, up)
        else:
            y = y + s * F.linear(F.linear(x, down), up)
    return y


BASES = {
    "linear": (lambda: nn.Linear(16, 12), lambda: torch.randn(3, 5, 16)),
    "conv1x1": (lambda: nn.Conv2d(8, 6, 1), lambda: torch.randn(3, 8, 5, 5)),
    "conv3x3": (lambda: nn.Conv2d(8, 6, 3, padding=1, stride=2), lambda: torch.randn(3, 8, 9, 9)),
}
SPECS = [("a", 4, 4.0), ("b", 2, 1.0), ("c", 8, 16.0)]


@pytest.fixture(params=list(BASES))
def setup(request):
    torch.manual_seed(0)
    make_base, make_x = BASES[request.param]
    base = make_base().requires_grad_(False)
    blend = Blend()
    layer = LoRALayer(base, blend)
    adapters = _adapters(base, SPECS)
    for name, (down, up, alpha) in adapters.items():
        layer.add(name, down, up, alpha)
    return layer, blend, adapters, make_x()


def test_live_sum_of_adapters_matches_formula(setup):
    layer, blend, adapters, x = setup
    weights = {"a": 0.8, "b": -0.5, "c": 1.7}
    blend.weights = dict(weights)
    blend.bump()
    torch.testing.assert_close(layer(x), _reference(layer.base, x, adapters, weights), atol=1e-5, rtol=1e-5)


def test_weight_change_is_picked_up_without_stale_scale(setup):
    layer, blend, adapters, x = setup
    for weights in ({"a": 1.0}, {"a": 0.25, "b": 2.0}, {"c": -1.0}, {}):
        blend.weights = dict(weights)
        blend.bump()
        torch.testing.assert_close(layer(x), _reference(layer.base, x, adapters, weights), atol=1e-5, rtol=1e-5)


def test_temporary_scale_leaves_nothing_behind(setup):
    layer, blend, _adapters, x = setup
    blend.weights = {"a": 1.0, "b": 1.0}
    blend.bump()
    before = layer(x)
    blend.scale = 0.0
    blend.bump()
    torch.testing.assert_close(layer(x), layer.base(x))
    blend.scale = 1.0
    blend.bump()
    torch.testing.assert_close(layer(x), before)


def test_fold_matches_live_and_unfold_is_bit_exact(setup):
    layer, blend, _adapters, x = setup
    original = layer.base.weight.detach().clone()
    blend.weights = {"a": 0.7, "b": 0.3, "c": -0.4}
    blend.bump()
    live = layer(x)
    layer.fold()
    torch.testing.assert_close(layer(x), live, atol=1e-5, rtol=1e-5)
    layer.unfold()
    assert torch.equal(layer.base.weight, original)


def test_on_the_cpu_the_saved_original_is_the_weight_itself_and_costs_memory_only_while_folded(setup):
    layer, blend, _adapters, _x = setup
    weight = layer.base.weight.data
    snapshot = weight.clone()
    assert layer.extra_bytes() == 0
    for weights in ({"a": 0.7}, {"a": 0.7, "b": -1.0}):  # a first fold, then a re-fold in place
        blend.weights = weights
        blend.bump()
        layer.fold()
        assert layer.original.data_ptr() == weight.data_ptr()  # no copy was made ...
        assert layer.base.weight.data_ptr() != weight.data_ptr()  # ... the folded weight is a tensor of its own
        assert torch.equal(weight, snapshot) and layer.extra_bytes() == weight.nbytes
    folded = layer.base.weight.data_ptr()
    blend.weights = {}  # every weight 0 while folded: the original values, in the same folded tensor
    blend.bump()
    layer.fold()
    assert layer.base.weight.data_ptr() == folded and torch.equal(layer.base.weight, snapshot)
    layer.unfold()
    assert layer.base.weight.data_ptr() == weight.data_ptr() and layer.extra_bytes() == 0
    assert torch.equal(layer.base.weight, snapshot)


def test_fold_into_a_half_precision_weight_sums_in_fp32_and_casts_once(setup):
    layer, blend, _adapters, _x = setup
    layer.base.half()
    original = layer.base.weight.detach().clone()
    blend.weights = {"a": 0.7, "c": -0.4}
    blend.bump()
    layer.fold()
    expected = (original.float() + layer.delta()).half()
    assert layer.base.weight.dtype == torch.float16 and torch.equal(layer.base.weight, expected)
    layer.unfold()
    assert torch.equal(layer.base.weight, original)


def test_refold_after_weight_change_never_drifts(setup):
    layer, blend, _adapters, _x = setup
    original = layer.base.weight.detach().clone()
    blend.weights = {"a": 1.0}
    blend.bump()
    layer.fold()
    first = layer.base.weight.detach().clone()
    for w in (0.3, -2.0, 5.0, 1.0):  # change weights while folded, ending where we started
        blend.weights = {"a": w}
        blend.bump()
        layer.fold()
    assert torch.equal(layer.base.weight, first)
    layer.unfold()
    assert torch.equal(layer.base.weight, original)


def test_routing_gives_each_sample_its_own_blend(setup):
    layer, blend, adapters, x = setup
    route = [{"a": 1.0}, {}, {"b": 0.5, "c": 2.0}]
    blend.route = route
    blend.bump()
    y = layer(x)
    for i, weights in enumerate(route):
        expected = _reference(layer.base, x[i:i + 1], adapters, weights)
        torch.testing.assert_close(y[i:i + 1], expected, atol=1e-5, rtol=1e-5)


def test_routing_tiles_over_a_doubled_batch(setup):
    layer, blend, _adapters, x = setup
    blend.route = [{"a": 1.0}, {}, {"c": 1.0}]
    blend.bump()
    y = layer(torch.cat([x, x]))
    torch.testing.assert_close(y[:3], y[3:])
    blend.route = [{"a": 1.0}, {}]
    blend.bump()
    with pytest.raises(ValueError, match="multiple of the route"):
        layer(x)


def test_remove_adapter(setup):
    layer, blend, adapters, x = setup
    blend.weights = {"a": 1.0, "b": 1.0}
    blend.bump()
    layer.remove("a")
    torch.testing.assert_close(layer(x), _reference(layer.base, x, {"b": adapters["b"]}, {"b": 1.0}),
                               atol=1e-5, rtol=1e-5)


def test_shape_mismatch_and_duplicates_are_refused():
    layer = LoRALayer(nn.Linear(16, 12), Blend())
    with pytest.raises(ValueError, match="do not fit"):
        layer.add("x", torch.zeros(4, 15), torch.zeros(12, 4))
    layer.add("x", torch.zeros(4, 16), torch.zeros(12, 4))
    with pytest.raises(ValueError, match="already exists"):
        layer.add("x", torch.zeros(4, 16), torch.zeros(12, 4))


def test_trainable_adapter_starts_at_base_and_gets_fp32_grads():
    base = nn.Linear(16, 12).to(torch.bfloat16).requires_grad_(False)
    blend = Blend(weights={"t": 1.0})
    layer = LoRALayer(base, blend)
    layer.add_new("t", rank=4, alpha=4, dropout=0.1)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base(x))  # zero-initialised up: training starts from the base model
    assert layer.down["t"].dtype == torch.float32 and layer.up["t"].requires_grad
    layer(x).float().sum().backward()
    assert layer.up["t"].grad is not None and layer.up["t"].grad.dtype == torch.float32
    assert base.weight.grad is None


def test_fp16_fold_does_not_drift_over_many_cycles():
    base = nn.Linear(64, 64).to(torch.float16).requires_grad_(False)
    original = base.weight.detach().clone()
    blend = Blend(weights={"a": 0.9})
    layer = LoRALayer(base, blend)
    layer.add("a", torch.randn(8, 64) * 0.1, torch.randn(64, 8) * 0.1, 8.0)
    layer.fold()
    first = base.weight.detach().clone()
    for _ in range(50):
        layer.unfold()
        blend.bump()
        layer.fold()
    assert torch.equal(base.weight, first)
    layer.unfold()
    assert torch.equal(base.weight, original)


def test_moving_the_layer_to_another_device_moves_the_blend_with_it(setup):
    """pipe.to(device) after a forward: the blend's cached factors must follow the weights, not stay behind."""
    layer, blend, _adapters, x = setup
    blend.weights = {"a": 0.5, "c": -1.0}
    blend.bump()
    layer(x)  # caches the concatenated factors on the CPU
    layer.to("meta")
    out = layer(x.to("meta"))
    assert out.device.type == "meta" and out.shape == layer.base(x.to("meta")).shape
    # meta tensors mix with CPU ones without complaint, where CUDA ones raise: so look at the cached factors
    assert {t.device.type for t in layer._cache[1:]} == {"meta"}
