import warnings

from dataclasses import replace

import pytest

import offload
from offload import Budget, OffloadWarning, PlanError
from offload.memory.experts import ExpertNeeds
from offload.memory.planner import MemoryNeeds, make_plan
from offload.models.shapes import shape_config

GB = 10**9
BW = {"host": 50 * GB, "hbm": 4000 * GB, "cuda:1": 400 * GB}


def needs(n_layers=40, block=GB, kv=GB // 2, **kw):
    return MemoryNeeds(blocks=(block,) * n_layers, global_bytes=GB // 2, kv_bytes=kv,
                       activation_bytes=GB // 4, workspace_bytes=GB // 4, **kw)


def plan(need, gpu, cpu=100 * GB, peers=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_plan(need, Budget(gpu, cpu, peers or {}), BW, "cuda:0", **kw)


def test_everything_fits_resident_and_warns_when_offload_was_asked_for():
    need = needs()
    p = plan(need, gpu=need.fixed_bytes + 40 * GB)
    assert p.placement == ["resident"] * 40 and p.slots == {}
    warned = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}), BW, "cuda:0", offload_requested=True)
    assert any("nothing is offloaded" in w for w in warned.warnings)
    assert "nothing is offloaded" in str(warned)


def test_layers_that_do_not_fit_go_to_the_host_spread_between_resident_ones():
    need = needs()
    p = plan(need, gpu=need.fixed_bytes + 12 * GB)  # 10 resident + 2 slots
    assert p.placement.count("resident") == 10 and p.placement.count("host") == 30 and p.slots == {"host": 2}
    assert p.gpu_bytes == need.fixed_bytes + 12 * GB
    assert p.host_bytes == 30 * GB
    resident = p.blocks_on("resident")
    assert max(b - a for a, b in zip(resident, resident[1:])) <= 5  # interleaved, not bunched up
    assert p.bottleneck == "host"
    assert p.predicted_step_seconds == pytest.approx(30 * GB / BW["host"])


def test_layers_that_all_fit_without_slots_stay_resident():
    """A budget of every layer but not the embedding: the embedding goes to the host and no layer streams (38
    resident and 2 through 2 slots would take the same bytes and copy 2 GB a step); a byte less and 3 stream."""
    need = needs(embedding_bytes=GB // 2)
    p = plan(need, gpu=need.fixed_bytes + 40 * GB)
    assert p.embedding_on_host and p.placement == ["resident"] * 40 and p.slots == {}
    assert p.predicted_step_seconds < 40 * GB / BW["hbm"] + GB / BW["host"]
    short = plan(need, gpu=need.fixed_bytes + 40 * GB - 1)
    assert short.placement.count("host") == 3 and short.slots == {"host": 2}


def test_kv_reservation_takes_the_place_of_layers():
    small, large = needs(kv=GB), needs(kv=5 * GB)
    budget = small.fixed_bytes + 20 * GB
    assert plan(large, budget).placement.count("resident") == plan(small, budget).placement.count("resident") - 4


def test_peers_and_host_share_the_streamed_layers_by_bandwidth():
    need = needs()
    p = plan(need, gpu=need.fixed_bytes + 4 * GB, peers={"cuda:1": 100 * GB})  # a ring of 2 slots per link
    assert p.slots == {"host": 2, "cuda:1": 2} and p.placement.count("resident") == 0
    peer, host = p.placement.count("cuda:1"), p.placement.count("host")
    assert peer + host == 40 and peer > host > 0
    seconds = p.link_seconds()
    assert abs(seconds["host"] - seconds["cuda:1"]) <= GB / BW["host"]  # the links finish together
    assert "1" in p.layer_map() and "H" in p.layer_map()


def test_refuses_when_fixed_parts_do_not_fit_and_says_how_much():
    need = needs(kv=30 * GB)
    with pytest.raises(PlanError) as e:
        plan(need, gpu=8 * 2**30)
    assert "KV cache 27.94 GiB" in str(e.value) and "8.00 GiB" in str(e.value)


def test_refuses_when_layers_fit_nowhere_naming_bytes():
    need = needs()
    with pytest.raises(PlanError) as e:
        plan(need, gpu=need.fixed_bytes + 12 * GB, cpu=5 * GB)
    message = str(e.value)
    assert "40 layers" in message and "25 layer(s)" in message and "--cpu-memory" in message


def test_refuses_when_slots_do_not_fit():
    need = needs()
    with pytest.raises(PlanError, match="slot"):
        plan(need, gpu=need.fixed_bytes + GB)


def test_warns_when_link_bound_by_far():
    need = needs()
    p = make_plan(need, Budget(need.fixed_bytes + 12 * GB, 100 * GB, {}), BW, "cuda:0")
    assert any("bound by the host link" in w for w in p.warnings)


def test_plan_model_issues_the_plans_warnings_once(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(shape_config("llama-2-13b")))
    with pytest.warns(OffloadWarning) as caught:
        p = offload.plan_model(tmp_path, dtype="bf16", gpu_memory="8GiB", cpu_memory="64GiB", max_seq_len=256,
                               link_bandwidth={"host": 55e9, "hbm": 4e12})
    assert [str(w.message) for w in caught] == p.warnings and p.warnings


def test_slots_are_reserved_only_for_links_that_stream():
    need = needs()
    budget = need.fixed_bytes + 40 * GB - 1  # one layer short: the fast peer takes the few streamed layers
    p = plan(need, gpu=budget, peers={"cuda:1": 100 * GB})
    assert p.slots == {"cuda:1": 2} and p.placement.count("resident") == 37  # not 35: no ring for the host
    assert p.gpu_bytes <= budget
    single = plan(need, gpu=budget, slots=1, peers={"cuda:1": 100 * GB})
    assert single.slots == {"cuda:1": 1} and single.placement.count("resident") == 38


def test_more_slots_take_the_place_of_resident_layers():
    need = needs()
    budget = need.fixed_bytes + 12 * GB
    assert plan(need, budget, slots=4).placement.count("resident") == 8
    assert plan(need, budget, slots=4).slots == {"host": 4}


def test_plan_is_printable_with_every_number():
    need = needs(max_batch=2, max_seq_len=512)
    text = str(plan(need, gpu=need.fixed_bytes + 12 * GB, peers={"cuda:1": 5 * GB}))
    for piece in ["resident", "host", "cuda:1", "KV cache", "2 x 512 tokens", "predicted decode step", "slot"]:
        assert piece in text


def test_plan_model_reads_only_the_config(tmp_path):
    """--plan must work without reading weights: a directory with only config.json plans fine."""
    import json

    (tmp_path / "config.json").write_text(json.dumps(shape_config("llama-2-13b")))
    p = offload.plan_model(tmp_path, dtype="bf16", gpu_memory="8GiB", cpu_memory="64GiB", max_seq_len=256,
                           link_bandwidth={"host": 55e9, "hbm": 4e12})
    assert p.placement.count("host") > 20 and p.placement.count("resident") > 0
    assert p.needs.largest_block == 2 * (5120 * (4 * 5120) + 3 * 5120 * 13824 + 2 * 5120)


def test_embedding_table_moves_to_host_ram_only_when_offloading():
    need = needs(embedding_bytes=GB // 2)
    whole = need.fixed_bytes + need.embedding_bytes + 40 * GB
    fits = plan(need, gpu=whole)
    assert not fits.embedding_on_host and fits.gpu_bytes == whole
    assert "besides resident layers: non-layer 476.84 MiB, embedding table 476.84 MiB, KV" in str(fits), str(fits)
    tight = plan(need, gpu=need.fixed_bytes + 12 * GB + GB // 2)
    assert tight.embedding_on_host and tight.placement.count("resident") == 10  # the half GB went to layers
    assert tight.host_ram_bytes == tight.host_bytes + GB // 2
    assert "embedding table" in str(tight)
    no_host_room = plan(need, gpu=need.fixed_bytes + 12 * GB + GB // 2, cpu=GB // 4, peers={"cuda:1": 100 * GB})
    assert not no_host_room.embedding_on_host  # the embedding stays on the GPU when the host cannot take it


def test_a_resident_step_is_predicted_from_its_products_rate_and_its_small_kernels():
    """Resident decode: every weight read at the measured rate of its format's products, plus the decode
    step's small kernels at the measured time of one, and its attention's cached keys at the attention kernel's
    measured rate (the HBM's where none was measured); a streamed step is bound by its link when that is slower."""
    need = needs(decode_kernels=40 * 6, products="int4", max_batch=16, max_seq_len=512)
    rates = dict(BW, **{"gemv-int4": 1000 * GB, "gemv-bf16": 4000 * GB, "kernels": 400_000})
    resident = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}), rates, "cuda:0")
    products = 40 * GB / (1000 * GB) + need.global_bytes / (4000 * GB)
    assert resident.compute_seconds() == pytest.approx(products + 240 / 400_000)
    assert resident.predicted_step_seconds == pytest.approx(products + 240 / 400_000)
    assert resident.bottleneck == "hbm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = make_plan(need, Budget(need.fixed_bytes + 12 * GB, 100 * GB, {}), rates, "cuda:0")
    assert streamed.predicted_step_seconds == pytest.approx(30 * GB / BW["host"])  # 30 layers over the host link
    no_kernels = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}), dict(rates, kernels=0.0), "cuda:0")
    assert no_kernels.predicted_step_seconds == pytest.approx(products)  # none measured: not counted
    per_key = need.kv_bytes / (16 * 512)  # every layer's key and value of one token
    cached = resident.step_seconds(16, keys=16 * 300)  # attention reads each row's cached keys from HBM
    assert cached == pytest.approx(resident.step_seconds(16) + 16 * 300 * per_key / BW["hbm"])
    measured = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}), dict(rates, attention=800 * GB),
                         "cuda:0")  # the attention kernel's own rate, where it was measured
    assert measured.step_seconds(16, keys=16 * 300) == pytest.approx(
        resident.step_seconds(16) + 16 * 300 * per_key / (800 * GB))


def test_a_resident_step_of_many_rows_is_priced_from_the_measured_16_row_products():
    """Products of several rows run other kernels, slower per byte (llama-2-7b in int4 on an H100: 3.04 ms a step
    at one row, 4.95 at 16), whose time barely changes from 2 rows to 16: the plan prices one row at the one-row
    rate and more at the 16-row rate (more rows bind on the matrix work instead); where 16 rows were not
    measured, every step is one row's."""
    need = needs(decode_kernels=0, products="int4")
    rates = dict(BW, **{"gemv-int4": 1000 * GB, "rows16-int4": 500 * GB, "gemv-bf16": 4000 * GB,
                        "rows16-bf16": 2000 * GB})
    resident = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}), rates, "cuda:0")
    one = 40 * GB / (1000 * GB) + need.global_bytes / (4000 * GB)
    assert resident.compute_seconds(1) == pytest.approx(one)
    assert resident.compute_seconds(16) == pytest.approx(2 * one) == resident.compute_seconds(64)
    assert resident.compute_seconds(2) == pytest.approx(2 * one) == resident.compute_seconds(6)
    assert resident.step_seconds(16) == pytest.approx(2 * one) and resident.predicted_step_seconds == pytest.approx(one)
    unmeasured = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}),
                           {k: v for k, v in rates.items() if not k.startswith("rows16")}, "cuda:0")
    assert unmeasured.compute_seconds(16) == pytest.approx(one)
    faster = make_plan(need, Budget(need.fixed_bytes + 40 * GB, 100 * GB, {}),
                       dict(rates, **{"rows16-int4": 2000 * GB, "rows16-bf16": 8000 * GB}), "cuda:0")
    assert faster.compute_seconds(16) == pytest.approx(one)  # never faster than one row's
    experts = ExpertNeeds(nbytes=GB // 8, per_layer=(8,) * 40, top_k=2)  # a routed expert sees a row or two
    moe = replace(need, experts=experts)
    routed = make_plan(moe, Budget(moe.fixed_bytes + 100 * GB, 100 * GB, {}), rates, "cuda:0")
    used = sum(experts.distinct(layer, 16) for layer in range(40)) * experts.nbytes
    assert routed.compute_seconds(16) == pytest.approx(2 * one + used / (1000 * GB))


def test_an_embedding_that_must_stay_stays_on_the_device_when_offloading():
    """Offloading sends an untied embedding table to host RAM (a step copies its tokens' rows), unless the int4
    draft reads it on the device too (``embedding_stays``): then it stays, and the layers get less room."""
    need = needs(embedding_bytes=GB)
    gpu = need.fixed_bytes + 12 * GB + GB // 2
    moved = make_plan(need, Budget(gpu, 100 * GB, {}), BW, "cuda:0")
    stays = make_plan(replace(need, embedding_stays=True), Budget(gpu, 100 * GB, {}), BW, "cuda:0")
    assert moved.embedding_on_host and not stays.embedding_on_host
    assert stays.placement.count("resident") < moved.placement.count("resident")
    assert stays.host_ram_bytes == stays.host_bytes and "in host RAM" not in str(stays)


def test_no_link_bound_warning_where_the_small_kernels_take_longer_than_the_link():
    need = needs(n_layers=8, block=2**20, decode_kernels=8 * 6, products="bf16")
    rates = dict(BW, **{"gemv-bf16": 4000 * GB, "kernels": 400_000})  # 48 kernels: 0.12 ms
    p = make_plan(need, Budget(need.fixed_bytes + 4 * 2**20, 100 * GB, {}), rates, "cuda:0")
    assert p.blocks_on("host") and p.bottleneck == "hbm"  # layers stream, yet the kernels take longer
    assert not any("bound by" in w for w in p.warnings)
    slow = make_plan(need, Budget(need.fixed_bytes + 4 * 2**20, 100 * GB, {}), dict(rates, host=GB), "cuda:0")
    assert slow.bottleneck == "host" and any("bound by the host link" in w for w in slow.warnings)


def test_a_products_measured_rate_is_cached_apart_for_each_setting_of_the_kernel_switches(monkeypatch):
    """Timing a kernel against another (``OFFLOAD_DOT_GEMV=1`` and so on) must not leave the default's plan priced
    by the other's rate: the products' keys carry the switches set; the links' do not."""
    from offload.memory import bandwidth

    names = ["host", "gemv-int4", "rows16-int4", "kernels", "attention"]
    for switch in bandwidth.KERNEL_SWITCHES:
        monkeypatch.delenv(switch, raising=False)
    plain = bandwidth.cache_keys("GPU", "cuda:0", names, 1)
    monkeypatch.setenv("OFFLOAD_DOT_GEMV", "1")
    switched = bandwidth.cache_keys("GPU", "cuda:0", names, 1)
    assert switched["host"] == plain["host"]
    assert all(switched[n] != plain[n] and switched[n].endswith("/OFFLOAD_DOT_GEMV=1") for n in names[1:])
    assert all(f"/v{bandwidth.CACHE_VERSION}" in key for key in plain.values())


def test_the_host_link_probe_pins_no_more_than_the_host_budget(monkeypatch):
    """A first load on a machine times the host link from pinned memory, 256 MiB of it: under a host budget below
    that, from pageable memory (or an earlier full probe's figure), never pinning past the budget, and not caching
    the lesser figure as the link's."""
    import torch

    from offload.distributed import TensorParallel
    from offload.memory import bandwidth

    probes, written = [], {}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "GPU")
    monkeypatch.setattr(bandwidth, "_read_cache", lambda: dict(written))
    monkeypatch.setattr(bandwidth, "_write_cache", lambda cache: written.update(cache))
    monkeypatch.setattr(bandwidth, "measure_host",
                        lambda device, size, repeats=5, pinned=True: probes.append((size, pinned)) or 5e10)
    for name in ("measure_device_copy", "measure_matmul"):
        monkeypatch.setattr(bandwidth, name, lambda *a, **k: 1e12)
    monkeypatch.setattr(bandwidth, "measure_gemv", lambda *a, **k: {})
    for name in ("measure_small_kernels", "measure_attention"):
        monkeypatch.setattr(bandwidth, name, lambda *a, **k: 0.0)
    links = bandwidth.link_bandwidths("cuda:0", [], TensorParallel(), 2**40, max_pinned_bytes=64 * 2**20)
    assert probes == [(bandwidth.PROBE_BYTES, False)] and links["host"] == 5e10
    assert not any("<-host/" in key for key in written)  # a pageable figure is not the pinned link's
    bandwidth.link_bandwidths("cuda:0", [], TensorParallel(), 2**40, max_pinned_bytes=2**40)
    assert probes[-1] == (bandwidth.PROBE_BYTES, True) and any("<-host/" in key for key in written)
    bandwidth.link_bandwidths("cuda:0", [], TensorParallel(), 2**40, max_pinned_bytes=0)
    assert len(probes) == 2  # all cached now: nothing measured again


@pytest.mark.parametrize("layers, slots, expected", [(8, None, (4, 2)), (8, 4, (3, 4)), (8, 9, (0, 7)),
                                                     (2, None, (0, 1)), (3, 2, (0, 2))])
def test_a_half_streaming_budget_streams_through_fewer_slots_than_layers(layers, slots, expected):
    """``streaming_half``: about half the layers resident, through a ring smaller than the layers it streams; its
    budget's plan streams every layer it does not keep (with as many slots as the budget holds them)."""
    need = needs(n_layers=layers)
    resident, ring = need.streaming_half(slots)
    assert (resident, ring) == expected
    p = plan(need, gpu=need.gpu_budget_streaming(resident, ring), slots=ring)
    assert p.placement.count("resident") == resident and p.placement.count("host") == layers - resident
