"""Tests for moe_infer.traces.trace: the moe_infer.trace/1 file format, Trace helpers, JSONL import."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moe_infer.traces.trace import FORMAT, UNKNOWN_TOKEN, Trace

# Shapes: N tokens, L MoE layers, K top-k, E experts, F feature columns.
NUM_EXPERTS = 8
MOE_LAYERS = (1, 3, 5)
TOP_K = 2
FEATURE_NAMES = {"embedding": (0, 4), "hidden_l1": (4, 6)}


def make_trace(
    seed: int,
    sequence_lengths=(5, 1, 3, 4),
    *,
    with_optional: bool = False,
    model: str = "tiny-moe",
    source: str = "random text",
) -> Trace:
    """A valid random trace; seq ids are a shuffled, gappy set so nothing relies on 0..S-1."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens, num_layers = sum(sequence_lengths), len(MOE_LAYERS)
    scores = torch.rand(num_tokens, num_layers, NUM_EXPERTS, generator=generator)  # [N, L, E]
    expert_ids = scores.argsort(dim=-1, descending=True)[..., :TOP_K]  # [N, L, K] int64
    expert_weights = torch.rand(num_tokens, num_layers, TOP_K, generator=generator)  # [N, L, K]
    sequence_ids = (torch.randperm(len(sequence_lengths), generator=generator) * 3 + 2).tolist()
    seq_ids = torch.cat(
        [
            torch.full((length,), seq_id)
            for seq_id, length in zip(sequence_ids, sequence_lengths, strict=True)
        ]
    )
    positions = torch.cat(
        [
            torch.arange(length) * 2 + int(torch.randint(0, 5, (), generator=generator))
            for length in sequence_lengths
        ]
    )
    optional = {}
    if with_optional:
        optional = {
            "router_logits": torch.randn(num_tokens, num_layers, NUM_EXPERTS, generator=generator),
            "features": torch.randn(num_tokens, 6, generator=generator),
            "feature_names": FEATURE_NAMES,
        }
    return Trace.from_arrays(
        expert_ids=expert_ids,
        expert_weights=expert_weights.double(),
        seq_ids=seq_ids,
        positions=positions,
        token_ids=torch.randint(0, 32000, (num_tokens,), generator=generator),
        num_experts=NUM_EXPERTS,
        moe_layers=MOE_LAYERS,
        model=model,
        family="mixtral",
        source=source,
        **optional,
    )


TENSOR_NAMES = (
    "expert_ids",
    "expert_weights",
    "seq_ids",
    "positions",
    "token_ids",
    "router_logits",
    "features",
)


def assert_traces_equal(actual: Trace, expected: Trace) -> None:
    for name in TENSOR_NAMES:
        actual_tensor, expected_tensor = getattr(actual, name), getattr(expected, name)
        if expected_tensor is None:
            assert actual_tensor is None, name
        else:
            assert actual_tensor.dtype == expected_tensor.dtype, name
            torch.testing.assert_close(actual_tensor, expected_tensor, rtol=0, atol=0, msg=name)
    assert actual.metadata() == expected.metadata()
    assert actual.moe_layers == expected.moe_layers
    assert actual.feature_names == expected.feature_names


def tensors_and_metadata(trace: Trace) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {
        name: getattr(trace, name) for name in TENSOR_NAMES if getattr(trace, name) is not None
    }
    return tensors, trace.metadata()


def reorder_sequences(trace: Trace, seq_id_order: list[int]) -> Trace:
    """The same sequences, with the same seq ids, stored in ``seq_id_order``."""
    parts = [trace.select_sequences([seq_id]) for seq_id in seq_id_order]
    return dataclasses.replace(
        Trace.concat(parts), seq_ids=torch.cat([part.seq_ids for part in parts])
    )


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("with_optional", [False, True])
def test_save_load_round_trip(tmp_path, with_optional):
    trace = make_trace(seed=1, with_optional=with_optional)
    path = tmp_path / "trace.safetensors"
    trace.save(path)
    loaded = Trace.load(path)
    assert_traces_equal(loaded, trace)
    assert loaded.metadata()["format"] == FORMAT
    assert json.loads(loaded.metadata()["moe_layers"]) == list(MOE_LAYERS)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.safetensors"]  # no temp file left


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "trace.safetensors"
    make_trace(seed=2).save(path)
    replacement = make_trace(seed=3, sequence_lengths=(2, 2))
    replacement.save(path)
    assert_traces_equal(Trace.load(path), replacement)


def test_shape_properties_and_sequences():
    trace = make_trace(seed=4, sequence_lengths=(5, 1, 3))
    assert (len(trace), trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts) == (
        9,
        9,
        len(MOE_LAYERS),
        TOP_K,
        NUM_EXPERTS,
    )
    runs = list(trace.sequences())
    assert [run.stop - run.start for _, run in runs] == [5, 1, 3]
    for seq_id, run in runs:
        assert (trace.seq_ids[run] == seq_id).all()
    assert trace.num_sequences == 3
    assert "tokens=9" in repr(trace) and "sequences=3" in repr(trace)


def test_empty_trace_round_trip(tmp_path):
    empty = make_trace(seed=27).select_sequences([])
    assert (len(empty), empty.num_sequences, list(empty.sequences())) == (0, 0, [])
    empty.save(tmp_path / "empty.safetensors")
    assert_traces_equal(Trace.load(tmp_path / "empty.safetensors"), empty)


# ------------------------------------------------------------------ from_arrays casting


def test_from_arrays_casts_numpy_and_torch_to_file_dtypes():
    reference = make_trace(seed=5, with_optional=True)
    cast = Trace.from_arrays(
        expert_ids=reference.expert_ids.numpy().astype(np.int64),
        expert_weights=reference.expert_weights.numpy().astype(np.float64),
        seq_ids=reference.seq_ids.numpy().astype(np.int16),
        positions=reference.positions.to(torch.int64),
        token_ids=reference.token_ids.numpy().astype(np.int64),
        router_logits=reference.router_logits.float().numpy(),
        features=reference.features.double(),
        feature_names=FEATURE_NAMES,
        num_experts=np.int64(NUM_EXPERTS),
        moe_layers=np.array(MOE_LAYERS),
        model=reference.model,
        family=reference.family,
        source=reference.source,
    )
    assert_traces_equal(cast, reference)  # also checks every dtype
    assert type(cast.num_experts) is int and cast.moe_layers == MOE_LAYERS


@pytest.mark.parametrize(
    "name, bad_value, pattern",
    [
        (
            "expert_ids",
            lambda t: t.expert_ids.float(),
            r"expert_ids: expected integer values.*float32",
        ),
        (
            "expert_weights",
            lambda t: t.expert_ids,
            r"expert_weights: expected floating-point.*int32",
        ),
        ("seq_ids", lambda t: t.seq_ids.bool(), r"seq_ids: expected integer values.*bool"),
        (
            "token_ids",
            lambda t: t.token_ids.long() + 2**31,
            r"token_ids: values in .* do not fit in int32",
        ),
        (
            "router_logits",
            lambda t: torch.full((len(t), len(MOE_LAYERS), NUM_EXPERTS), 1e6),
            r"router_logits: values up to .* overflow float16",
        ),
    ],
)
def test_from_arrays_rejects_lossy_casts(name, bad_value, pattern):
    trace = make_trace(seed=6)
    arrays = {
        n: getattr(trace, n)
        for n in ("expert_ids", "expert_weights", "seq_ids", "positions", "token_ids")
    }
    arrays[name] = bad_value(trace)
    with pytest.raises(ValueError, match=pattern):
        Trace.from_arrays(**arrays, num_experts=NUM_EXPERTS, moe_layers=MOE_LAYERS)


def test_from_arrays_rejects_non_arrays():
    trace = make_trace(seed=7)
    with pytest.raises(
        TypeError, match="seq_ids must be a torch.Tensor or numpy.ndarray, got list"
    ):
        Trace.from_arrays(
            expert_ids=trace.expert_ids,
            expert_weights=trace.expert_weights,
            seq_ids=trace.seq_ids.tolist(),
            positions=trace.positions,
            token_ids=trace.token_ids,
            num_experts=NUM_EXPERTS,
            moe_layers=MOE_LAYERS,
        )


# ------------------------------------------------------------------ concat, select, split


def test_concat_offsets_seq_ids_and_preserves_data():
    first = make_trace(seed=8, with_optional=True, source="wiki")
    second = make_trace(seed=9, sequence_lengths=(2, 6), with_optional=True, source="code")
    joined = Trace.concat([first, second])
    assert len(joined) == len(first) + len(second)
    assert joined.num_sequences == first.num_sequences + second.num_sequences
    head, tail = slice(0, len(first)), slice(len(first), None)
    for name in TENSOR_NAMES:
        if name != "seq_ids":
            torch.testing.assert_close(
                getattr(joined, name)[head], getattr(first, name), rtol=0, atol=0
            )
            torch.testing.assert_close(
                getattr(joined, name)[tail], getattr(second, name), rtol=0, atol=0
            )
    assert torch.equal(joined.seq_ids[head], first.seq_ids)
    offset = int(first.seq_ids.max()) + 1
    assert torch.equal(joined.seq_ids[tail], second.seq_ids + offset)
    assert set(joined.seq_ids[head].tolist()).isdisjoint(joined.seq_ids[tail].tolist())
    assert joined.source == "wiki\ncode"
    assert joined.feature_names == FEATURE_NAMES


def test_concat_rejects_mismatches():
    base = make_trace(seed=10, with_optional=True)
    with pytest.raises(
        ValueError, match=r"concat: trace 1 has model='other'.*trace 0 has 'tiny-moe'"
    ):
        Trace.concat([base, make_trace(seed=11, model="other")])
    without_logits = dataclasses.replace(
        make_trace(seed=12, with_optional=True), router_logits=None
    )
    with pytest.raises(
        ValueError, match=r"router_logits is present in traces \[0\] but missing in \[1\]"
    ):
        Trace.concat([base, without_logits])
    with pytest.raises(ValueError, match="at least one trace"):
        Trace.concat([])


def test_select_sequences_keeps_order_and_rejects_unknown_ids():
    trace = make_trace(seed=13)
    runs = list(trace.sequences())
    chosen = [runs[2][0], runs[0][0]]
    selected = trace.select_sequences(chosen)
    assert [seq_id for seq_id, _ in selected.sequences()] == [runs[0][0], runs[2][0]]
    assert torch.equal(selected.expert_ids[: runs[0][1].stop], trace.expert_ids[runs[0][1]])
    with pytest.raises(ValueError, match=r"seq ids \[1000\] are not in this trace"):
        trace.select_sequences([1000])


def test_split_is_deterministic_disjoint_and_complete():
    trace = make_trace(seed=14, sequence_lengths=tuple(range(1, 21)))
    kept, held_out = trace.split(0.25, seed=3)
    kept_again, held_out_again = trace.split(0.25, seed=3)
    assert_traces_equal(kept, kept_again)
    assert_traces_equal(held_out, held_out_again)
    kept_ids = {seq_id for seq_id, _ in kept.sequences()}
    held_ids = {seq_id for seq_id, _ in held_out.sequences()}
    assert len(held_ids) == 5 and kept_ids.isdisjoint(held_ids)
    assert kept_ids | held_ids == {seq_id for seq_id, _ in trace.sequences()}
    assert len(kept) + len(held_out) == len(trace)
    # Membership depends on the seq ids and the seed, not on the storage order.
    reordered = reorder_sequences(trace, [seq_id for seq_id, _ in trace.sequences()][::-1])
    assert {s for s, _ in reordered.split(0.25, seed=3)[1].sequences()} == held_ids
    other_seed_ids = {seq_id for seq_id, _ in trace.split(0.25, seed=4)[1].sequences()}
    assert other_seed_ids != held_ids
    with pytest.raises(ValueError, match=r"held_out_fraction must be in \(0, 1\), got 1.5"):
        trace.split(1.5)


# ------------------------------------------------------------------ validation of bad files


def write_raw(path, tensors, metadata):
    save_file(
        {name: tensor.contiguous() for name, tensor in tensors.items()}, path, metadata=metadata
    )
    return path


def test_load_rejects_wrong_dtype(tmp_path):
    tensors, metadata = tensors_and_metadata(make_trace(seed=15))
    for stored in (torch.float32, torch.int64):
        path = write_raw(
            tmp_path / f"{stored}.safetensors",
            {**tensors, "expert_ids": tensors["expert_ids"].to(stored)},
            metadata,
        )
        with pytest.raises(
            ValueError,
            match=rf"{path.name}: expert_ids: expected dtype int32, got {str(stored)[6:]}",
        ):
            Trace.load(path)


def test_load_rejects_missing_tensor(tmp_path):
    tensors, metadata = tensors_and_metadata(make_trace(seed=16))
    del tensors["positions"]
    path = write_raw(tmp_path / "missing.safetensors", tensors, metadata)
    with pytest.raises(
        ValueError, match=r"missing\.safetensors: missing tensor\(s\) \['positions'\]"
    ):
        Trace.load(path)


@pytest.mark.parametrize(
    "change, pattern",
    [
        # N mismatch between expert_weights and expert_ids
        (
            lambda t, m: t.update(expert_weights=t["expert_weights"][:-1]),
            r"expert_weights: expected shape \[N, L, K\] = \[13, 3, 2\].*got \[12, 3, 2\]",
        ),
        # L != len(moe_layers)
        (
            lambda t, m: m.update(moe_layers="[1, 3]"),
            r"expert_ids: shape \[13, 3, 2\] has L=3 layers, but moe_layers lists 2",
        ),
        # K in metadata disagrees with the tensor
        (
            lambda t, m: m.update(top_k="4"),
            r"metadata top_k=4 but expert_ids has shape \[13, 3, 2\] \(K=2\)",
        ),
        # K mismatch between expert_weights and expert_ids
        (
            lambda t, m: t.update(expert_weights=t["expert_weights"][..., :1]),
            r"expert_weights: expected shape .* got \[13, 3, 1\]",
        ),
        # token_ids too short
        (
            lambda t, m: t.update(token_ids=t["token_ids"][:5]),
            r"token_ids: expected shape \[N\] = \[13\].*got \[5\]",
        ),
        # router_logits with the wrong E
        (
            lambda t, m: t.update(router_logits=t["router_logits"][..., :4]),
            r"router_logits: expected shape \[N, L, E\] = \[13, 3, 8\]",
        ),
    ],
)
def test_load_rejects_inconsistent_shapes(tmp_path, change, pattern):
    tensors, metadata = tensors_and_metadata(make_trace(seed=17, with_optional=True))
    change(tensors, metadata)
    path = write_raw(tmp_path / "shapes.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=pattern):
        Trace.load(path)


@pytest.mark.parametrize("kept_fraction", [0.0, 0.001, 0.5, 0.99])  # empty, inside header, data
def test_load_rejects_truncated_file(tmp_path, kept_fraction):
    path = tmp_path / "truncated.safetensors"
    make_trace(seed=18).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept_fraction)])
    with pytest.raises(
        ValueError, match=r"truncated\.safetensors: truncated or not a safetensors trace"
    ):
        Trace.load(path)


@pytest.mark.parametrize("format_value", ["moe_infer.trace/2", "moe_infer.checkpoint/1", None])
def test_load_rejects_wrong_format_string(tmp_path, format_value):
    tensors, metadata = tensors_and_metadata(make_trace(seed=19))
    if format_value is None:
        del metadata["format"]
    else:
        metadata["format"] = format_value
    path = write_raw(tmp_path / "format.safetensors", tensors, metadata)
    with pytest.raises(
        ValueError, match=rf"format is {format_value!r}, expected 'moe_infer.trace/1'"
    ):
        Trace.load(path)


def test_load_rejects_non_contiguous_sequence(tmp_path):
    tensors, metadata = tensors_and_metadata(make_trace(seed=20, sequence_lengths=(3, 3, 3)))
    seq_ids = tensors["seq_ids"].clone()
    seq_ids[6:] = seq_ids[0]  # the first sequence reappears after the second
    tensors["seq_ids"] = seq_ids
    path = write_raw(tmp_path / "split.safetensors", tensors, metadata)
    with pytest.raises(
        ValueError,
        match=rf"seq_ids: sequence {int(seq_ids[0])} is not contiguous"
        r".*index 0 and again at index 6",
    ):
        Trace.load(path)


def test_load_rejects_positions_out_of_order(tmp_path):
    tensors, metadata = tensors_and_metadata(make_trace(seed=21, sequence_lengths=(4, 2)))
    positions = tensors["positions"].clone()
    positions[2] = positions[1]
    tensors["positions"] = positions
    path = write_raw(tmp_path / "order.safetensors", tensors, metadata)
    with pytest.raises(
        ValueError, match=r"positions: not strictly increasing.*token 1 has position"
    ):
        Trace.load(path)


@pytest.mark.parametrize("bad_id", [NUM_EXPERTS, -1])  # one past the end; "no expert" padding
def test_load_rejects_out_of_range_expert_id(tmp_path, bad_id):
    tensors, metadata = tensors_and_metadata(make_trace(seed=22))
    expert_ids = tensors["expert_ids"].clone()
    expert_ids[4, 1, 1] = bad_id
    tensors["expert_ids"] = expert_ids
    path = write_raw(tmp_path / "range.safetensors", tensors, metadata)
    with pytest.raises(
        ValueError,
        match=rf"expert_ids: {bad_id} at token 4, layer 1, slot 1 is outside \[0, num_experts=8\)",
    ):
        Trace.load(path)


def test_rejects_repeated_expert_and_non_finite_weight():
    trace = make_trace(seed=23)
    expert_ids = trace.expert_ids.clone()
    expert_ids[2, 0, 1] = expert_ids[2, 0, 0]
    with pytest.raises(ValueError, match="expert_ids: token 2, layer 0 chooses an expert twice"):
        dataclasses.replace(trace, expert_ids=expert_ids)
    weights = trace.expert_weights.clone()
    weights[3, 2, 0] = float("nan")
    with pytest.raises(
        ValueError, match="expert_weights: nan at token 3, layer 2, slot 0 is not finite"
    ):
        dataclasses.replace(trace, expert_weights=weights)


# ------------------------------------------------------------------ JSONL import


def write_jsonl(path, trace: Trace, *, shuffle_seed: int | None = None, with_tokens: bool = True):
    records = []
    for token in range(len(trace)):
        for layer_index, layer in enumerate(trace.moe_layers):
            record = {
                "seq": int(trace.seq_ids[token]),
                "pos": int(trace.positions[token]),
                "layer": layer,
                "experts": trace.expert_ids[token, layer_index].tolist(),
                "weights": trace.expert_weights[token, layer_index].tolist(),
            }
            if with_tokens:
                record["token"] = int(trace.token_ids[token])
            records.append(json.dumps(record))
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(records)
    path.write_text("\n".join(records) + "\n")
    return path


def test_from_jsonl_matches_from_arrays(tmp_path):
    trace = make_trace(seed=24)
    path = write_jsonl(tmp_path / "routing.jsonl", trace, shuffle_seed=0)
    imported = Trace.from_jsonl(
        path, num_experts=NUM_EXPERTS, model="tiny-moe", family="mixtral", source="random text"
    )
    # JSONL import stores tokens sorted by (seq, pos)
    expected = reorder_sequences(trace, sorted(seq_id for seq_id, _ in trace.sequences()))
    assert_traces_equal(imported, expected)
    # Also with explicit moe_layers, no tokens, and the default source.
    path = write_jsonl(tmp_path / "no_tokens.jsonl", trace, with_tokens=False)
    imported = Trace.from_jsonl(path, num_experts=NUM_EXPERTS, moe_layers=MOE_LAYERS)
    assert (imported.token_ids == UNKNOWN_TOKEN).all()
    assert imported.source == "jsonl:no_tokens.jsonl"


@pytest.mark.parametrize(
    "edit, pattern",
    [
        # the last token loses one layer
        (lambda lines: lines[:-1], r"seq \d+ pos \d+ has no record for layer\(s\) \[5\]"),
        # one record repeated
        (
            lambda lines: lines + [lines[4]],
            r":\d+: duplicate record for seq \d+ pos \d+ layer 3 \(first on line 5\)",
        ),
        # not JSON
        (
            lambda lines: lines[:2] + ['{"seq": 0, "pos": '] + lines[2:],
            r"routing\.jsonl:3: not valid JSON",
        ),
        # a key missing
        (
            lambda lines: (
                lines[:1]
                + ['{"seq": 0, "pos": 1, "experts": [1, 2], "weights": [0.5, 0.5]}']
                + lines[1:]
            ),
            r"routing\.jsonl:2: missing key\(s\) \['layer'\]",
        ),
        # expert id out of range
        (
            lambda lines: (
                lines
                + ['{"seq": 99, "pos": 0, "layer": 1, "experts": [1, 8], "weights": [0.5, 0.5]}']
            ),
            r":\d+: experts must be .* in \[0, num_experts=8\), got \[1, 8\]",
        ),
        # weights and experts of different length
        (
            lambda lines: (
                lines + ['{"seq": 99, "pos": 0, "layer": 1, "experts": [1, 2], "weights": [1.0]}']
            ),
            r":\d+: weights must be a list of 2 finite numbers",
        ),
        # top_k changes between lines
        (
            lambda lines: (
                lines
                + ['{"seq": 99, "pos": 0, "layer": 1, "experts": [1, 2, 3], "weights": [1, 1, 1]}']
            ),
            r":\d+: 3 experts, but line 1 has 2",
        ),
        # tokens disagree across layers of one (seq, pos)
        (
            lambda lines: [
                lines[0].replace('"token": ', '"token": 1') if i == 0 else line
                for i, line in enumerate(lines)
            ],
            r":2: token \d+ for seq \d+ pos \d+, but line 1 says",
        ),
    ],
)
def test_from_jsonl_rejects_malformed_logs(tmp_path, edit, pattern):
    trace = make_trace(seed=25, sequence_lengths=(3, 2))
    path = write_jsonl(tmp_path / "routing.jsonl", trace)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    with pytest.raises(ValueError, match=pattern):
        Trace.from_jsonl(path, num_experts=NUM_EXPERTS)


def test_from_jsonl_rejects_layer_outside_moe_layers_and_empty_log(tmp_path):
    trace = make_trace(seed=26, sequence_lengths=(2,))
    path = write_jsonl(tmp_path / "routing.jsonl", trace)
    with pytest.raises(
        ValueError, match=r"routing\.jsonl:3: layer 5 is not in moe_layers \[1, 3\]"
    ):
        Trace.from_jsonl(path, num_experts=NUM_EXPERTS, moe_layers=(1, 3))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no routing records"):
        Trace.from_jsonl(empty, num_experts=NUM_EXPERTS)
