import torch

from engine.core.request import MIN_TEMPERATURE, SamplingParams
from engine.native.sampler import Sampler, SampleRow, filtered_probs, logprobs_of


def _logits(n=3, v=50, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = _logits()
    rows = [SampleRow(SamplingParams(temperature=0), 0)] * 3
    assert Sampler()(x, rows) == x.argmax(-1).tolist()


def test_banned_token_never_chosen():
    x = _logits()
    top = x.argmax(-1).tolist()
    rows = [SampleRow(SamplingParams(temperature=0), 0, (top[i],)) for i in range(3)]
    out = Sampler()(x, rows)
    assert all(o != t for o, t in zip(out, top))


def test_seeded_sampling_independent_of_batch_and_position_in_batch():
    x = _logits(4)
    p = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler(seed=1)(x[2:3], [SampleRow(p, 7)])
    other = SamplingParams(temperature=1.0)
    mixed = Sampler(seed=99)(x, [SampleRow(other, 0), SampleRow(other, 3), SampleRow(p, 7), SampleRow(other, 1)])
    assert mixed[2] == alone[0]
    # a different output index draws different noise (same logits, many indices -> not all equal)
    draws = {Sampler()(x[2:3], [SampleRow(p, i)])[0] for i in range(30)}
    assert len(draws) > 1


def test_top_k_top_p_min_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (filtered_probs(logits, SamplingParams(top_k=2)) > 0).tolist() == [True, True, False, False]
    # mass before token 2 is 0.8 >= 0.8 -> dropped; token 1 kept (mass before it is 0.5)
    assert (filtered_probs(logits, SamplingParams(top_p=0.8)) > 0).tolist() == [True, True, False, False]
    assert (filtered_probs(logits, SamplingParams(top_p=0.81)) > 0).tolist() == [True, True, True, False]
    assert (filtered_probs(logits, SamplingParams(min_p=0.5)) > 0).tolist() == [True, True, False, False]
    p = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(p.sum(), torch.tensor(1.0))
    assert p[0] > 0.5  # low temperature sharpens


def test_sampling_follows_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).expand(1, 3)
    s = Sampler(seed=0)
    counts = torch.zeros(3)
    for i in range(3000):
        counts[s(logits, [SampleRow(SamplingParams(temperature=1.0), i)])[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.04)


def test_logprobs_of_matches_log_softmax():
    x = _logits(2)
    chosen, tops = logprobs_of(x, torch.tensor([3, 4]), 2)
    lp = torch.log_softmax(x, -1)
    assert abs(chosen[0] - lp[0, 3].item()) < 1e-6 and abs(chosen[1] - lp[1, 4].item()) < 1e-6
    assert list(tops[0]) == torch.topk(lp[0], 2).indices.tolist()


def _unfloored(temperature: float, **kwargs) -> SamplingParams:
    """Params whose temperature skipped SamplingParams' floor: what the kernel must survive on its own."""
    params = SamplingParams(temperature=1.0, **kwargs)
    object.__setattr__(params, "temperature", temperature)
    return params


def test_a_tiny_temperature_gives_no_nan_and_all_mass_on_the_argmax():
    x = _logits(1)[0] * 10  # logits in the tens, as a real model's are
    for t in (1e-300, 1e-40, MIN_TEMPERATURE):
        probs = filtered_probs(x, _unfloored(t, top_p=0.9, min_p=0.1))
        assert not probs.isnan().any(), t
        assert probs.argmax() == x.argmax() and probs.max() == 1.0, t


def test_the_sampler_picks_the_argmax_below_the_temperature_floor():
    x = _logits(3) * 10
    greedy = x.argmax(-1).tolist()
    rows = [SampleRow(SamplingParams(temperature=1e-300, seed=s), 0) for s in range(3)]
    assert Sampler()(x, rows) == greedy
    mixed = [SampleRow(_unfloored(1e-300, seed=1), 0), SampleRow(SamplingParams(temperature=1.0), 0)]
    assert Sampler()(x[:2], mixed)[0] == greedy[0]  # the kernel path itself, in a batch with a sampled row
