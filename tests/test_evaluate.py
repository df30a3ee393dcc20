import math

import torch

from mamlrun.run.evaluation import headline, summarize, table_rows


def test_ci95_is_1_96_population_std_over_sqrt_n():
    values = torch.tensor([[1.0, 0.5], [2.0, 0.5], [3.0, 1.5], [4.0, 1.5]], dtype=torch.float64)
    stats = summarize(values)
    mean = values.mean(0)
    std = ((values - mean) ** 2).mean(0).sqrt()  # ddof=0, as the authors' np.std
    assert stats["mean"] == mean.tolist()
    for step in range(2):
        assert math.isclose(stats["std"][step], float(std[step]), rel_tol=1e-12)
        assert math.isclose(stats["ci95"][step], 1.96 * float(std[step]) / 2.0, rel_tol=1e-12)
    assert stats["median"] == [2.0, 0.5]


def test_headline_and_table_report_every_step_and_setting():
    stats = summarize(torch.rand(10, 11))
    report = {"metric": "mse", "inner_steps": 10, "results": {"K=5": {"mse": stats}}}
    flat = headline(report)
    assert flat["test/K5/mse_step10"] == stats["mean"][10]
    assert flat["test/K5/mse_step1_ci95"] == stats["ci95"][1]
    columns, rows = table_rows(report)
    assert columns[1:] == [
        "mse after 0 steps",
        "mse after 1 step",
        "mse after 5 steps",
        "mse after 10 steps",
    ]
    assert rows[0][0] == "K=5" and rows[0][2] == f"{stats['mean'][1]:.3f} ± {stats['ci95'][1]:.3f}"


def test_diverged_tasks_are_counted_not_hidden():
    values = torch.tensor([[1.0, 0.5], [2.0, float("inf")], [3.0, float("nan")], [4.0, 0.75]])
    stats = summarize(values)
    assert stats["diverged"] == [0, 2]
    assert not math.isfinite(stats["mean"][1]), "a diverged task must not vanish from the mean"
    assert stats["median"] == [2.0, 0.75]  # nan ranks as +inf; torch takes the lower middle
    report = {"metric": "mse", "inner_steps": 1, "results": {"K=5": {"mse": stats}}}
    assert "(2 diverged" in table_rows(report)[1][0][2]
