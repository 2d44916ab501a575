import pytest

from offload import Budget, BudgetError, parse_size
from offload.memory.budget import beyond_machine, parse_peer_flag


@pytest.mark.parametrize("text, expected", [
    ("20GiB", 20 * 2**30), ("500MB", 500 * 10**6), ("0", 0), ("1.5GiB", 3 * 2**29), ("123", 123),
    (" 2 gib ", 2 * 2**30), ("64KiB", 65536), ("3G", 3 * 2**30), ("7B", 7), (4096, 4096),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "20 GiBs", "-1GiB", "1..5GB", "GiB", "1e9", True, -5,
                                  "\uff14GiB", "1.\uff15GiB", "\u0663"])  # other scripts' digits: Decimal reads them
def test_parse_size_rejects_bad_values(text):
    with pytest.raises(BudgetError):
        parse_size(text, "gpu memory")


def test_bad_size_message_names_the_flag_and_value():
    with pytest.raises(BudgetError, match=r"gpu memory: cannot parse '20 GB of RAM'"):
        Budget.parse(gpu_memory="20 GB of RAM")


def test_accelerate_style_max_memory_dict():
    budget = Budget.parse({0: "20GiB", "cuda:1": "40GiB", "cpu": "100GiB"}, compute_device="cuda:0")
    assert budget.gpu_memory == 20 * 2**30
    assert budget.cpu_memory == 100 * 2**30
    assert budget.peer_memory == {"cuda:1": 40 * 2**30}


def test_max_memory_dict_on_a_cpu_only_machine():
    budget = Budget.parse({"cpu": "2GiB"}, compute_device="cpu")
    assert budget.gpu_memory == 2 * 2**30 and budget.cpu_memory is None


def test_dict_and_separate_budgets_cannot_be_mixed():
    with pytest.raises(BudgetError, match="not both"):
        Budget.parse({0: "1GiB"}, cpu_memory="1GiB")


def test_peer_flag():
    assert parse_peer_flag("cuda:1=40GiB") == ("cuda:1", 40 * 2**30)
    assert parse_peer_flag("2=1MiB") == ("cuda:2", 2**20)
    for bad in ["cuda:1", "=4GiB", "cuda:1=lots", "nowhere:3=1GiB"]:
        with pytest.raises(BudgetError):
            parse_peer_flag(bad)


def test_unset_budgets_come_from_free_memory_on_cpu():
    budget = Budget().resolved("cpu")
    assert budget.gpu_memory > 0 and budget.cpu_memory == 0
    explicit = Budget(gpu_memory=5, cpu_memory=7).resolved("cpu")
    assert (explicit.gpu_memory, explicit.cpu_memory) == (5, 7)


def test_budgets_beyond_the_machine_are_a_plan_warning(tiny):
    import psutil

    import offload

    ram = psutil.virtual_memory().total
    assert beyond_machine(Budget(gpu_memory=2**20, cpu_memory=2**20), "cpu") == []
    (warning,) = beyond_machine(Budget(gpu_memory=2**20, cpu_memory=2 * ram), "cpu")
    assert "the host budget (--cpu-memory)" in warning and "RAM" in warning
    plan = offload.plan_model(tiny, gpu_memory=2 * ram, max_seq_len=64)
    assert any("is more than this machine's" in w for w in plan.warnings)
