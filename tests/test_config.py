"""Config composition for every combination of group options, and one-line validation errors."""

import itertools
from importlib import resources

import pytest

from mamlrun.config.compose import compose_config
from mamlrun.config.validate import captures_cuda_graph, validate
from mamlrun.errors import ConfigError, UserError

GROUPS = ("dataset", "model", "algorithm", "hardware", "logger")


def options(group: str) -> list[str]:
    folder = resources.files("mamlrun.conf") / group
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


# folder_drawings is folder's schema with other values: one combination of it is enough
COMBINATIONS = [
    c
    for c in itertools.product(*(options(g) for g in GROUPS))
    if c[0] != "folder_drawings" or c[1:] == ("conv4_omniglot", "maml", "cpu", "none")
]


def test_every_group_has_options():
    assert {"maml", "fomaml"} <= set(options("algorithm"))
    assert {"cpu", "cuda"} <= set(options("hardware")) and {"wandb", "none"} <= set(
        options("logger")
    )


@pytest.mark.parametrize("choice", COMBINATIONS, ids=lambda c: "-".join(c))
def test_every_combination_composes_and_validates(choice):
    dataset, model = choice[0], choice[1]
    required = ["dataset.root=my_images"] if dataset.startswith("folder") else []  # no default
    cfg = compose_config([f"{g}={o}" for g, o in zip(GROUPS, choice, strict=True)] + required)
    if dataset == "sinusoid" and model.startswith("conv4"):
        with pytest.raises(ConfigError, match="^model: .* needs an image dataset"):
            validate(cfg)
        return
    typed = validate(cfg)
    assert typed.algorithm.first_order == (choice[2] == "fomaml")
    assert typed.hardware.device.startswith(choice[3])
    assert typed.dataset.name == ("folder" if dataset.startswith("folder") else dataset)


def test_default_is_the_papers_sinusoid_setting():
    typed = validate(compose_config([]))
    assert typed.dataset.name == "sinusoid" and typed.dataset.shots == 10
    assert typed.model.hidden == [40, 40] and typed.model.activation == "relu"
    algorithm = typed.algorithm
    assert (algorithm.inner_lr, algorithm.inner_steps, algorithm.meta_batch_size) == (0.01, 1, 25)
    assert algorithm.meta_lr == 0.001 and not algorithm.first_order
    assert typed.train.iterations == 70000 and typed.logger.mode == "offline"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("algorithm.inner_lr=-0.1", "algorithm.inner_lr"),
        ("algorithm.meta_lr=-1", "algorithm.meta_lr"),
        ("algorithm.inner_steps=-1", "algorithm.inner_steps"),
        ("algorithm.test_inner_steps=-2", "algorithm.test_inner_steps"),
        ("algorithm.meta_batch_size=0", "algorithm.meta_batch_size"),
        ("algorithm.grad_clip=-1", "algorithm.grad_clip"),
        ("dataset.shots=0", "dataset.shots"),
        ("dataset.query_shots=0", "dataset.query_shots"),
        ("dataset.amplitude=[5,1]", "dataset.amplitude"),
        ("train.iterations=abc", "train.iterations"),
        ("train.log_every=0", "train.log_every"),
        ("eval.tasks=1", "eval.tasks"),
        ("seed=abc", "seed"),
        ("logger.mode=sometimes", "logger.mode"),
        ("+algorithm.inner_lr_typo=1", "algorithm.inner_lr_typo"),
        ("+sed=3", "sed"),
        ("algorithm.meta_optimizer._target_=torch.optim.Nope", "algorithm.meta_optimizer._target_"),
        ("+algorithm.meta_optimizer.betaz=1", "algorithm.meta_optimizer"),
        ("dataset=omniglot dataset.ways=1", "dataset.ways"),
        ("dataset=omniglot dataset.ways=200", "dataset.ways"),
        ("dataset=omniglot dataset.shots=0", "dataset.shots"),
        ("dataset=omniglot dataset.shots=15 dataset.query_shots=6", "dataset.query_shots"),
        ("dataset=omniglot dataset.shots=30", "dataset.shots: must be < 20"),
        ("model.activation=gelu2", "model.activation: choose relu or tanh, got 'gelu2'"),
        (
            "dataset=omniglot dataset.shots=10 dataset.test_query_shots=11",
            "dataset.test_query_shots",
        ),
        ("dataset=miniimagenet dataset.ways=21", "dataset.ways"),
        ("dataset=miniimagenet dataset.image_size=32", "dataset.image_size"),
        ("dataset=omniglot model.pooling=avg", "model.pooling"),
        ("hardware.precision=fp16", "hardware.precision"),
        ("hardware.device=gpu", "hardware.device"),
        ("seed=-1", "seed"),
        ("dataset=omniglot dataset.split_seed=4294967296", "dataset.split_seed"),
        ("algorithm.meta_optimizer._partial_=false", "algorithm.meta_optimizer._partial_"),
        ("hardware.precision=tf32", "hardware.precision"),  # on hardware=cpu
        ("hardware.cuda_graphs=true", "hardware.cuda_graphs"),  # on hardware=cpu
        ("hardware=cuda hardware.cuda_graphs=sometimes", "hardware.cuda_graphs"),
        (
            "hardware=cuda hardware.cuda_graphs=true algorithm.engine=learn2learn",
            "hardware.cuda_graphs",
        ),
        ("hardware=cuda hardware.cuda_graphs=true algorithm=pretrain", "hardware.cuda_graphs"),
        (  # refused before any work, not when the step is built
            "hardware=cuda hardware.cuda_graphs=true "
            "algorithm.meta_optimizer._target_=torch.optim.Adagrad",
            "hardware.cuda_graphs: torch.optim.Adagrad cannot be captured",
        ),
    ],
)
def test_bad_values_fail_with_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        validate(compose_config(override.split()))
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "captured"),
    [
        ("hardware=cuda", True),  # cuda.yaml's auto, the vmap engine's MAML
        ("hardware=cuda algorithm=fomaml", True),
        ("hardware=cuda algorithm.engine=learn2learn", False),  # auto stays eager, no error
        ("hardware=cuda algorithm=pretrain", False),
        ("hardware=cuda algorithm.meta_optimizer._target_=torch.optim.Adagrad", False),
        ("hardware=cuda algorithm.meta_optimizer._target_=torch.optim.SGD", True),
        ("hardware=cuda hardware.cuda_graphs=false", False),
        ("hardware=cpu", False),
        ("hardware=cpu hardware.cuda_graphs=auto", False),
    ],
)
def test_cuda_graphs_auto_captures_where_the_step_can_be_captured(overrides, captured):
    typed = validate(compose_config(overrides.split()))
    assert captures_cuda_graph(typed.hardware, typed.algorithm) is captured


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        ("omniglot", {"model": ("conv4", 64), "inner_lr": 0.4, "steps": (1, 3), "batch": 32}),
        ("miniimagenet", {"model": ("conv4", 32), "inner_lr": 0.01, "steps": (5, 10), "batch": 4}),
    ],
)
def test_vision_datasets_bring_the_papers_settings(dataset, expected):
    typed = validate(compose_config([f"dataset={dataset}"]))
    algorithm = typed.algorithm
    assert (typed.model.name, typed.model.filters) == expected["model"]
    assert (
        algorithm.inner_lr == expected["inner_lr"]
        and algorithm.meta_batch_size == expected["batch"]
    )
    assert (algorithm.inner_steps, algorithm.test_inner_steps) == expected["steps"]
    assert typed.train.iterations == 60000
    # The command line still wins over the dataset's defaults.
    typed = validate(
        compose_config([f"dataset={dataset}", "algorithm.inner_lr=0.2", "model=mlp_omniglot"])
    )
    assert typed.algorithm.inner_lr == 0.2 and typed.model.batch_norm


def test_dataset_root_defaults_to_mamlrun_data(monkeypatch):
    monkeypatch.setenv("MAMLRUN_DATA", "/data/here")
    assert validate(compose_config(["dataset=omniglot"])).dataset.root == "/data/here"
    monkeypatch.delenv("MAMLRUN_DATA")
    assert validate(compose_config(["dataset=omniglot"])).dataset.root.startswith(
        "~/.cache/mamlrun"
    )


PRESETS = sorted(
    f"finn2017/{p.name.removesuffix('.yaml')}"
    for p in (resources.files("mamlrun.conf") / "experiment" / "finn2017").iterdir()
    if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_paper_preset_composes_and_validates(preset):
    typed = validate(compose_config([f"experiment={preset}"]))
    paper = typed.paper
    assert paper.table and paper.cell and paper.value is not None
    dataset, algorithm = typed.dataset, typed.algorithm
    assert dataset.name in preset
    if dataset.name == "omniglot":
        expected = (0.4, 1, 3, 32) if dataset.ways == 5 else (0.1, 5, 5, 16)
        assert (
            algorithm.inner_lr,
            algorithm.inner_steps,
            algorithm.test_inner_steps,
            algorithm.meta_batch_size,
        ) == expected
        assert f"{dataset.ways}w{dataset.shots}s" in preset
    if dataset.name == "miniimagenet":
        assert algorithm.grad_clip == 10 and dataset.train_query_shots == 15
        assert algorithm.first_order == ("_fo_" in preset)


def test_eval_requires_a_checkpoint():
    with pytest.raises(ConfigError, match="^checkpoint: required"):
        validate(compose_config([], "eval"), primary="eval")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["dataset=imagenet"],
            "Could not find 'dataset/imagenet' (choose from folder, folder_drawings, miniimagenet,",
        ),
        (["algorithm.inner_rate=0.1"], "Could not override 'algorithm.inner_rate' (no such key;"),
        (["--help"], "--help"),
    ],
)
def test_composition_errors_are_one_line_user_errors(overrides, message):
    """What Hydra refuses while composing (outside `mamlrun train`, which Hydra runs itself)."""
    with pytest.raises(UserError) as error:
        compose_config(overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def _leaf_keys(node, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        if hasattr(value, "items"):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        elif not key.startswith("_"):
            keys.append(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize("dataset", ["sinusoid", "omniglot", "folder"])
def test_every_key_refuses_hostile_values_in_one_line(dataset):
    """Fuzzed input: every leaf key of the composed config, set to a wrong type, a negative
    number or a list, either validates or fails with a one-line UserError naming a key; never
    another exception (a traceback for the user)."""
    base = [f"dataset={dataset}"] + (["dataset.root=my_images"] if dataset == "folder" else [])
    keys = [k for k in _leaf_keys(compose_config(base)) if k != "paper"]
    assert len(keys) > 40
    accepted = []
    for key, value in itertools.product(keys, ["abc", "-1", "[1,2]"]):
        try:
            validate(compose_config([*base, f"{key}={value}"]))
            accepted.append(f"{key}={value}")
        except UserError as error:
            assert "\n" not in str(error) and ("." in str(error) or ":" in str(error)), error
    # strings such as logger names take anything; numbers and lists mostly do not
    assert len(accepted) < len(keys), accepted
