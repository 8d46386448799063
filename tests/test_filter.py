"""Data filters: budgets, thresholds, cold start, learning from rewards, state round trip."""

import io

import pytest
import torch

from lada.plugin.filter import FilterConfig, LadaFilter, cluster_spread, kmeans, make_filter


def blobs(n_per: int, centers: list[list[float]], seed: int = 0, spread: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(centers)
    label = torch.arange(len(centers)).repeat_interleave(n_per)
    return c[label] + spread * torch.randn(len(label), c.shape[1], generator=g), label


def reward_of(x: torch.Tensor) -> torch.Tensor:
    """A synthetic learning gain that depends on one context feature only."""
    return 0.05 * torch.tanh(2 * x[:, 0])


def test_budget_for_and_config_validation():
    from lada.config import ConfigError

    cfg = FilterConfig(budget_fraction=0.5, max_budget=0)
    assert cfg.budget_for(7) == 4 and cfg.budget_for(0) == 0
    assert FilterConfig(budget_fraction=0.5, max_budget=3).budget_for(100) == 3
    with pytest.raises(ConfigError, match="kind"):
        FilterConfig(kind="bandit").validate("plugin.filter")
    with pytest.raises(ConfigError, match="budget_fraction"):
        FilterConfig(budget_fraction=0).validate("plugin.filter")


def test_none_random_loss_filters():
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    nll = torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0, 2.0, 7.0, 4.0, 8.0, 6.0])
    x[:, -4] = nll
    assert make_filter(FilterConfig(kind="none")).select(x, 3) == list(range(10))
    r = make_filter(FilterConfig(kind="random"))
    a, b = r.select(x, 4, rng=1), r.select(x, 4, rng=1)
    assert a == b and len(set(a)) == 4 and r.select(x, 4, rng=2) != a
    picked = make_filter(FilterConfig(kind="loss")).select(x, 3)
    assert picked == [3, 1, 5]  # the three lowest NLLs, lowest first
    with pytest.raises(ValueError, match="nll_column"):
        make_filter(FilterConfig(kind="loss", nll_column=6)).select(x, 3)


def test_bad_contexts_name_the_problem():
    f = make_filter(FilterConfig())
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        f.select(torch.zeros(4), 2)
    x = torch.zeros(3, 2)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="row 1, column 1"):
        f.select(x, 2)


def test_kmeans_is_deterministic_and_finds_blobs():
    x, label = blobs(20, [[0, 0], [5, 5], [-5, 5]])
    c1, a1 = kmeans(x, 3, seed=3)
    c2, a2 = kmeans(x, 3, seed=3)
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    # every blob maps to a single cluster
    for b in range(3):
        assert len(set(a1[label == b].tolist())) == 1
    # more clusters than points: no crash, every point its own cluster at most
    _, a = kmeans(x[:2], 5, seed=0)
    assert a.shape == (2,)


def test_cold_start_spreads_budget_over_clusters():
    x, label = blobs(30, [[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6]], seed=1)
    f = LadaFilter(FilterConfig(num_clusters=4, seed=0))
    chosen = f.select(x, 8)
    assert len(chosen) == 8 and len(set(chosen)) == 8
    counts = torch.bincount(label[chosen], minlength=4)
    assert counts.tolist() == [2, 2, 2, 2]
    assert f.diagnostics()["cold_start"] == 1.0
    assert cluster_spread(x, 8, 4, 0) == chosen  # same seed, same choice (on standardised inputs too)


def test_selection_respects_budget_and_threshold():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    f = LadaFilter(FilterConfig(threshold=0.5, epochs=5, seed=0))
    f.update(x[:100], reward_of(x[:100]))
    scores = f.scores(x)
    chosen = f.select(x, 1000)
    above = int((scores >= 0.5).sum())
    assert len(chosen) == above and all(scores[i] >= 0.5 for i in chosen)
    scores = f.scores(x)  # the previous select added x to the input statistics
    chosen = f.select(x, 10)
    assert len(chosen) == 10
    top10 = torch.argsort(-scores, stable=True)[:10].tolist()
    assert chosen == top10
    f_strict = LadaFilter(FilterConfig(threshold=1.0, epochs=5, seed=0))
    f_strict.update(x[:100], reward_of(x[:100]))
    assert len(f_strict.select(x, 50)) == 1  # only the best candidate reaches 1.0


def test_bandit_learns_reward_feature_better_than_random():
    g = torch.Generator().manual_seed(0)
    f = LadaFilter(FilterConfig(alpha=0.1, epochs=10, seed=0))
    rand = make_filter(FilterConfig(kind="random"))
    gains_bandit, gains_random = [], []
    for rnd in range(4):
        x = torch.randn(300, 8, generator=g)
        budget = 60
        chosen = f.select(x, budget)
        base = rand.select(x, budget, rng=rnd)
        gains_bandit.append(float(reward_of(x[chosen]).mean()))
        gains_random.append(float(reward_of(x[base]).mean()))
        f.update(x[chosen], reward_of(x[chosen]))
        # after the cold start the bandit also sees a few random samples' rewards
        f.update(x[base[:20]], reward_of(x[base[:20]]))
    # rounds after the first: clearly above the random subset's mean gain
    later_bandit = sum(gains_bandit[1:]) / 3
    later_random = sum(gains_random[1:]) / 3
    assert later_bandit > later_random + 0.02, (gains_bandit, gains_random)
    d = f.diagnostics()
    assert d["updates"] == 8 and d["history"] == len(f.hist_r) > 0


def test_rewards_update_history_fifo():
    f = LadaFilter(FilterConfig(history_size=50, epochs=1))
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    f.update(x, reward_of(x))
    assert len(f.hist_r) == 30 and f.diagnostics()["history"] == 30
    f.update(x[:25] + 1, reward_of(x[:25] + 1))
    assert len(f.hist_r) == 50
    assert torch.equal(f.hist_x[-25:], x[:25] + 1)  # newest kept, oldest dropped
    assert torch.equal(f.hist_x[0], x[5])
    with pytest.raises(ValueError, match="3 contexts but 2 rewards"):
        f.update(x[:3], torch.zeros(2))
    with pytest.raises(ValueError, match="columns"):
        f.update(torch.zeros(2, 7), torch.zeros(2))


def test_state_round_trip_is_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=g)
    f = LadaFilter(FilterConfig(epochs=3, seed=4))
    f.select(x, 40)
    f.update(x[:40], reward_of(x[:40]))
    path = tmp_path / "filter.pt"
    torch.save(f.state_dict(), path)
    g2 = LadaFilter(FilterConfig(epochs=3, seed=4))
    g2.load_state_dict(torch.load(path, weights_only=False))
    assert torch.equal(f.scores(x), g2.scores(x))
    assert f.select(x, 30) == g2.select(x, 30)
    # training continues identically after the round trip
    f.update(x[40:80], reward_of(x[40:80]))
    g2.update(x[40:80], reward_of(x[40:80]))
    assert torch.equal(f.scores(x), g2.scores(x))
    with pytest.raises(ValueError, match="cannot load"):
        make_filter(FilterConfig(kind="random")).load_state_dict(f.state_dict())


def test_filter_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    x = torch.rand(20, 4)
    torch.manual_seed(123)
    f = LadaFilter(FilterConfig(epochs=2))
    f.select(x, 5)
    f.update(x[:5], reward_of(x[:5]))
    f.select(x, 5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("rows,k", [([0.0, 0.0, 0.0, 0.0, 1.0], 4), ([0.0, 0.0, 1.0, 0.0, 1.0], 4),
                                    ([0.0, 1.0, 0.0, 1.0, 1.0], 5), ([2.0, 2.0, 2.0, -1.0, -1.0, 3.0, 3.0, 3.0, 3.0], 8)])
def test_kmeans_on_duplicate_points_gives_clusters_on_the_points(rows, k):
    """More clusters asked than distinct points: one cluster per distinct point, every
    centroid exactly on a point, none empty, nothing NaN (an earlier re-seeding re-used
    one point for two empty clusters and gave a centroid at 0.5 for the first case)."""
    x = torch.tensor(rows).unsqueeze(1)
    distinct = sorted(set(rows))
    for seed in range(5):
        centroids, assign = kmeans(x, k, seed=seed)
        assert torch.isfinite(centroids).all()
        assert sorted(centroids[:, 0].tolist()) == distinct
        assert torch.bincount(assign, minlength=len(centroids)).min() >= 1
        assert torch.equal(centroids[assign], x)  # every point sits on its own cluster's centroid


def test_kmeans_reseeds_an_emptied_cluster_without_emptying_another():
    """Two far blobs and k = 4 from a seeding that can start two centroids in one blob:
    whatever the iterations do, every cluster ends with a member and a finite centroid."""
    x, _ = blobs(6, [[0, 0], [10, 10]], seed=2)
    for seed in range(10):
        centroids, assign = kmeans(x, 4, seed=seed)
        assert torch.isfinite(centroids).all() and torch.bincount(assign, minlength=4).min() >= 1


def test_exploration_net_learns_the_residual_of_f1_at_decision_time(monkeypatch):
    """EE-Net: f2's target is r - f1(x) with f1 as it was when x was chosen (stored in
    the history), not the residual of the freshly refitted f1 on its own training data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 4, generator=g)
    f = LadaFilter(FilterConfig(epochs=2, seed=0, budget_fraction=0.5))
    chosen = f.select(x, 30)
    predicted = f.decision_predictions()
    assert predicted.shape == (30,)
    twin = LadaFilter(FilterConfig(epochs=2, seed=0, budget_fraction=0.5))
    f1_before, _ = twin.predict(x[chosen])  # f1 (untrained, reward units 0/1) before the selection moved the input statistics
    assert torch.allclose(predicted, f1_before)
    targets = []
    real_fit = LadaFilter._fit

    def spy(self, net, opt, inputs, y, gen):
        targets.append(y.clone())
        return real_fit(self, net, opt, inputs, y, gen)

    monkeypatch.setattr(LadaFilter, "_fit", spy)
    r = reward_of(x[chosen])
    f.update(x[chosen], r, predicted)
    assert torch.equal(f.hist_f1, predicted)
    y = (f.hist_r - f.r_mean) / f.r_std
    assert torch.allclose(targets[0], y)  # f1 regresses the standardised reward
    assert torch.allclose(targets[1], y - (predicted - f.r_mean) / f.r_std)  # f2: residual at decision time
    # a later selection records f1's prediction as it then stands, in reward units
    f1_warm, _ = f.predict(x)
    second = f.select(x, 10)
    assert torch.allclose(f.decision_predictions(), f1_warm[second] * f.r_std + f.r_mean)
    assert torch.equal(f.state_dict()["hist_f1"], predicted)
