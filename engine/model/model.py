"""The DeepSeek-V4 model: embedding → blocks (mHC around attention and MoE) → hc_head, norm, head.

`V4Model` is built from a `fetch(name, dtype)` function that returns dequantized tensors under the
official checkpoint names (spec §4.2), so the same code serves a real checkpoint, a tiny one
written by our writer, and in-memory test weights.

Public use::

    state = model.new_state()
    logits = model.prefill(ids, state, chunk_size=None)   # logits of the last position, [V]
    logits = model.decode(token_id, state)                # [V]
    all_logits = model.forward_full(ids)                  # [S, V], no cache kept
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flashdesk.engine.cache import LayerState, SequenceState, new_layer_state
from flashdesk.engine.config import LayerSpec, ModelConfig
from flashdesk.engine.interrupt import Interrupted
from flashdesk.engine.model.attention import Attention, StepPositions
from flashdesk.engine.model.common import Fetch, Linear, Numerics, rms_norm
from flashdesk.engine.model.compressor import Compressor
from flashdesk.engine.model.indexer import Indexer
from flashdesk.engine.model.mhc import hc_head, hc_post, hc_post_then, hc_pre
from flashdesk.engine.model.moe import DenseExperts, MoE, Router, SharedExpert
from flashdesk.engine.model.rope import Rotary, inverse_frequencies

F32 = torch.float32

# make_experts(layer spec) -> the routed-expert executor of that block, any callable with
# DenseExperts' signature (the runtime passes one that reads the packed FP4 weights in place).
MakeExperts = Callable[[LayerSpec], Any]


class ModelInputError(ValueError):
    """Token ids the model cannot take (empty, out of vocabulary, wrong shape)."""


def rotary_tables(config: ModelConfig) -> tuple[Rotary, Rotary]:
    """(main, compress): θ=rope_theta plain for window layers; compress_rope_theta + YaRN."""
    rd = config.qk_rope_head_dim
    main = Rotary(rd, inverse_frequencies(rd, config.rope_theta))
    compress = Rotary(
        rd,
        inverse_frequencies(
            rd,
            config.compress_rope_theta,
            config.rope_factor,
            config.rope_original_max_position,
            config.rope_beta_fast,
            config.rope_beta_slow,
        ),
    )
    return main, compress


class Block:
    """One decoder block (spec §2.4); also the body of an MTP block."""

    def __init__(
        self,
        config: ModelConfig,
        spec: LayerSpec,
        fetch: Fetch,
        numerics: Numerics,
        rotaries: tuple[Rotary, Rotary],
        make_experts: MakeExperts | None = None,
    ):
        self.spec = spec
        self.config = config
        p = spec.prefix
        dt = numerics.dtype
        eps = config.rms_norm_eps
        # (fn [24, hc·D], scale [3], base [24]) of the two mHC sites
        self.hc_attn = tuple(fetch(f"{p}hc_attn_{n}", F32) for n in ("fn", "scale", "base"))
        self.hc_ffn = tuple(fetch(f"{p}hc_ffn_{n}", F32) for n in ("fn", "scale", "base"))
        self.attn_norm = fetch(p + "attn_norm.weight", F32)
        self.ffn_norm = fetch(p + "ffn_norm.weight", F32)

        rotary = rotaries[1] if spec.has_compressor else rotaries[0]
        a = p + "attn."
        compressor = indexer = None
        if spec.has_compressor:
            compressor = _compressor(
                fetch, a + "compressor.", spec.compress_ratio, rotary, eps, False
            )
        if spec.has_indexer:
            indexer = Indexer(
                wq_b=Linear(fetch(a + "indexer.wq_b.weight", dt), True),
                weights_proj=Linear(fetch(a + "indexer.weights_proj.weight", dt), False),
                compressor=_compressor(
                    fetch, a + "indexer.compressor.", spec.compress_ratio, rotary, eps, True
                ),
                n_heads=config.index_n_heads,
                head_dim=config.index_head_dim,
                topk=config.index_topk,
            )
        self.attn = Attention(
            wq_a=Linear(fetch(a + "wq_a.weight", dt), True),
            q_norm=fetch(a + "q_norm.weight", F32),
            wq_b=Linear(fetch(a + "wq_b.weight", dt), True),
            wkv=Linear(fetch(a + "wkv.weight", dt), True),
            kv_norm=fetch(a + "kv_norm.weight", F32),
            wo_a=fetch(a + "wo_a.weight", dt),
            wo_b=Linear(fetch(a + "wo_b.weight", dt), True),
            sink=fetch(a + "attn_sink", F32),
            n_heads=config.num_attention_heads,
            head_dim=config.head_dim,
            o_groups=config.o_groups,
            window=config.sliding_window,
            ratio=spec.compress_ratio,
            rotary=rotary,
            eps=eps,
            compressor=compressor,
            indexer=indexer,
        )

        f = p + "ffn."
        if spec.hash_routed:
            bias, tid2eid = None, fetch(f + "gate.tid2eid", torch.int64).long()
        else:
            bias, tid2eid = fetch(f + "gate.bias", F32), None
        router = Router(
            weight=fetch(f + "gate.weight", F32),
            bias=bias,
            tid2eid=tid2eid,
            top_k=config.num_experts_per_tok,
            scale=config.routed_scaling_factor,
        )
        if make_experts is not None:
            experts = make_experts(spec)  # the runtime's executor: no dequantized copy here
        else:
            experts = _dense_experts(config, fetch, f, dt)
        shared = SharedExpert(
            *(Linear(fetch(f"{f}shared_experts.{w}.weight", dt), True) for w in ("w1", "w2", "w3")),
            limit=config.swiglu_limit,
        )
        self.moe = MoE(router, experts, shared)

    def forward(
        self,
        x: torch.Tensor,  # [S, hc, D] streams
        ids: torch.Tensor,  # [S] token ids (hash routing)
        start: int,
        state: LayerState,
        numerics: Numerics,
    ) -> torch.Tensor:
        """Streams `[S, hc, D]` of positions start..start+S-1 → new streams `[S, hc, D]`."""
        sim = numerics.simulate_quant
        a, post, comb = self._site_input(x, self.hc_attn, self.attn_norm)
        f = self.attn.forward(a, start, state, numerics.query_block, sim)
        x = hc_post(f, x, post, comb)
        a, post, comb = self._site_input(x, self.hc_ffn, self.ffn_norm)
        return hc_post(self.moe.forward(a, ids, sim), x, post, comb)

    def step_attention(
        self,
        x: torch.Tensor,  # [1, hc, D]
        pos: torch.Tensor,  # [1] int64 on the device
        cos: torch.Tensor,
        sin: torch.Tensor,
        state: LayerState,
        at: StepPositions | None = None,
        mixes: torch.Tensor | None = None,
        out: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step's attention half with fixed shapes (`Attention.step`; `at` shared by
        the step's layers) → streams after attention `[1, hc, D]`, the MoE's normed input
        `[1, D]` and the FFN site's post `[1, hc]` and comb `[1, hc, hc]` for `hc_post` once
        the MoE's output is known. `mixes`: x's attention-site mixes as the previous
        `hc_post_then` gave them, or None. `out`: four tensors to hold the results (a captured
        step's fixed buffers, written by the kernels themselves where they can)."""
        fixed_x, fixed_rest = (out[0], out[1:]) if out is not None else (None, None)
        a, post, comb = self._site_input(x, self.hc_attn, self.attn_norm, mixes)
        f = self.attn.step(a, pos, cos, sin, state, at)
        x, mixes = hc_post_then(f, x, post, comb, then=self.hc_ffn[0], out=fixed_x)
        a, post, comb = self._site_input(x, self.hc_ffn, self.ffn_norm, mixes, fixed_rest)
        return x, a, post, comb

    def _site_input(self, x, hc, norm, mixes=None, out=None):
        """mHC collapse of the streams at one site, normed → (block input `[S, D]`, post, comb)."""
        c = self.config
        return hc_pre(x, *hc, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps, norm, mixes, out)


def _dense_experts(config: ModelConfig, fetch: Fetch, f: str, dt: torch.dtype) -> DenseExperts:
    n_exp = config.n_routed_experts
    stacked = {}
    for w in ("w1", "w2", "w3"):  # filled in place: no list + stack double copy
        first = fetch(f"{f}experts.0.{w}.weight", dt)
        stacked[w] = torch.empty((n_exp, *first.shape), dtype=first.dtype, device=first.device)
        stacked[w][0] = first
        for e in range(1, n_exp):
            stacked[w][e] = fetch(f"{f}experts.{e}.{w}.weight", dt)
    return DenseExperts(stacked["w1"], stacked["w2"], stacked["w3"], config.swiglu_limit)


def _compressor(
    fetch: Fetch, p: str, ratio: int, rotary: Rotary, eps: float, for_indexer: bool
) -> Compressor:
    return Compressor(
        wkv=fetch(p + "wkv.weight", F32),
        wgate=fetch(p + "wgate.weight", F32),
        ape=fetch(p + "ape", F32),
        norm=fetch(p + "norm.weight", F32),
        ratio=ratio,
        rotary=rotary,
        eps=eps,
        for_indexer=for_indexer,
    )


class MTPBlock:
    """The multi-token-prediction draft head (spec §2.9): from the main model's final 4-stream
    state at position i and the embedding of token i+1 it predicts token i+2."""

    def __init__(
        self,
        config: ModelConfig,
        spec: LayerSpec,
        fetch: Fetch,
        numerics: Numerics,
        rotaries: tuple[Rotary, Rotary],
        make_experts: MakeExperts | None = None,
    ):
        p = spec.prefix
        dt = numerics.dtype
        self.block = Block(config, spec, fetch, numerics, rotaries, make_experts)
        self.e_proj = Linear(fetch(p + "e_proj.weight", dt), True)
        self.h_proj = Linear(fetch(p + "h_proj.weight", dt), True)
        self.enorm = fetch(p + "enorm.weight", F32)
        self.hnorm = fetch(p + "hnorm.weight", F32)
        self.norm = fetch(p + "norm.weight", F32)
        self.hc_head = tuple(fetch(f"{p}hc_head_{n}", F32) for n in ("fn", "scale", "base"))


class V4Model:
    """DeepSeek-V4 in torch; device-agnostic (weights live where `fetch` + `device` put them)."""

    def __init__(
        self,
        config: ModelConfig,
        fetch: Fetch,
        *,
        device: torch.device | str = "cpu",
        numerics: Numerics | None = None,
        with_mtp: bool = False,
        make_experts: MakeExperts | None = None,
    ):
        """make_experts: builds each block's routed-expert executor instead of the dequantized
        `DenseExperts` (the runtime's hook; None keeps the plain all-in-memory model)."""
        self.config = config
        self.numerics = numerics or Numerics()
        self.device = torch.device(device)
        dev = self.device

        def fetch_on(name: str, dtype: torch.dtype) -> torch.Tensor:
            return fetch(name, dtype).to(dev)

        dt = self.numerics.dtype
        main, compress = rotary_tables(config)
        self.rotaries = (main.to(dev), compress.to(dev))
        # The embedding stays in host memory (one row read per token; the planner counts it in
        # RAM): 1 GB of VRAM for V4-Flash is worth more holding experts.
        self.embed = fetch("embed.weight", dt)
        # The reference computes logits in float32 against a float32 head.
        self.head = fetch_on("head.weight", F32)
        # A replacement for `linear(h.float(), self.head)` → float32 logits (the runtime's
        # bf16/FP8 head on the CPU); None: the float32 head above.
        self.head_linear: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._interrupt: Callable[[], bool] | None = None  # `set_interrupt`
        self.norm = fetch_on("norm.weight", F32)
        self.hc_head = tuple(fetch_on(f"hc_head_{n}", F32) for n in ("fn", "scale", "base"))
        self.blocks = [
            Block(config, spec, fetch_on, self.numerics, self.rotaries, make_experts)
            for spec in config.main_layers
        ]
        self.mtp = (
            [
                MTPBlock(config, s, fetch_on, self.numerics, self.rotaries, make_experts)
                for s in config.mtp_layers
            ]
            if with_mtp
            else []
        )
        # Speculative decoding with the MTP block (`enable_speculation`): prefill then also
        # feeds the block, whose draft `Session` verifies with `verify` / `reject_last`.
        self.speculative = False

    def set_interrupt(self, asked: Callable[[], bool] | None) -> None:
        """`asked()` is polled between the layers of every call of several tokens; True stops
        the call with `Interrupted` (a long prompt chunk stops within a layer of a cancel,
        not at its end). None: never."""
        self._interrupt = asked

    # ------------------------------------------------------------------ state

    def new_state(self, kv_format: str | None = None) -> SequenceState:
        """Empty per-sequence state (window rings, compressed KV, compressor carry).

        kv_format (default: `numerics.kv_format`) "native" stores KV rows in the model's dtype;
        "bf16" in BF16; "fp8" in the packed layout of spec §3.2: FP8 KV entries (583 B each; equal
        to "bf16" when the model simulates the reference's quantisation) and FP8 index keys with
        a per-key scale (132 B), or, when it simulates, FP4 ones (68 B each, exact).
        """
        c = self.config
        if kv_format is None:
            kv_format = self.numerics.kv_format

        def layer(spec: LayerSpec):
            return new_layer_state(
                window=c.sliding_window,
                head_dim=c.head_dim,
                rope_dim=c.qk_rope_head_dim,
                ratio=spec.compress_ratio,
                index_head_dim=c.index_head_dim,
                kv_dtype=self.numerics.dtype,
                device=self.device,
                kv_format=kv_format,
                pack_index_keys=kv_format == "fp8" and self.numerics.simulate_quant,
            )

        return SequenceState(
            layers=[layer(s) for s in c.main_layers],
            mtp=[layer(m.block.spec) for m in self.mtp],
        )

    # ------------------------------------------------------------------ forward

    def _ids(self, ids) -> torch.Tensor:
        """Token ids checked → `[S]` int64 in host memory (checking them there costs the GPU no
        sync; the embedding is read there too)."""
        t = torch.as_tensor(ids, dtype=torch.long).cpu()
        if t.dim() == 0:
            t = t.view(1)
        if t.dim() != 1:
            raise ModelInputError(
                f"token ids must be one sequence (1-D), got shape {tuple(t.shape)}; "
                "pass one prompt at a time"
            )
        if t.numel() == 0:
            raise ModelInputError("no token ids given; the prompt must hold at least one token")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ModelInputError(
                f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1}); "
                "the tokenizer does not match this checkpoint"
            )
        return t

    def _embed(self, host_ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows of host ids `[S]` → `[S, D]` on the model's device."""
        return self.embed[host_ids].to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward_streams(self, ids, state: SequenceState) -> torch.Tensor:
        """Run tokens through every block, advancing `state`; → final streams `[S, hc, D]`."""
        host_ids = self._ids(ids)
        ids = host_ids.to(self.device, non_blocking=True)
        start = state.position
        e = self._embed(host_ids)  # [S, D]
        x = e.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()
        asked = self._interrupt if ids.numel() > 1 else None
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            if asked is not None and asked():
                raise Interrupted(f"stopped before layer {block.spec.index}")
            x = block.forward(x, ids, start, layer_state, self.numerics)
        state.position = start + ids.numel()
        return x

    def logits_from_streams(
        self, x: torch.Tensor, mixes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Streams `[n, hc, D]` → logits `[n, V]` float32 (hc_head, norm, head). `mixes`: the
        head's, as the last layer's `hc_post_then` gave them, or None."""
        c = self.config
        h = hc_head(x, *self.hc_head, c.hc_eps, c.rms_norm_eps, self.norm, mixes)
        return self.head_logits(h)

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normed hidden `[n, D]` → float32 logits `[n, V]` through the head."""
        if self.head_linear is not None:
            return self.head_linear(h)
        return torch.nn.functional.linear(h.float(), self.head)

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int] | torch.Tensor, state: SequenceState, chunk_size=None):
        """Feed a prompt (or its continuation) into `state`; → logits of its last token `[V]`.

        `chunk_size` bounds the tokens per pass (activation memory); any size gives the same
        state and logits as one pass. With speculation on, the MTP block takes the chunk's rows
        too (`_feed_draft`).
        """
        ids = self._ids(ids)
        if chunk_size is not None and chunk_size < 1:
            raise ModelInputError(f"chunk_size must be ≥ 1, got {chunk_size}")
        step = ids.numel() if chunk_size is None else int(chunk_size)
        x = None
        for i in range(0, ids.numel(), step):
            chunk = ids[i : i + step]
            x = self.forward_streams(chunk, state)
            if self.speculative:
                self._feed_draft(x, chunk.tolist(), state)
        return self.logits_from_streams(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, token_id: int, state: SequenceState) -> torch.Tensor:
        """One token after the state's last one → logits of the next `[V]`."""
        return self.prefill([int(token_id)], state)

    @torch.inference_mode()
    def forward_full(self, ids) -> torch.Tensor:
        """Logits `[S, V]` for every position of `ids` in one pass (a fresh, discarded state)."""
        state = self.new_state()
        return self.logits_from_streams(self.forward_streams(ids, state))

    # ------------------------------------------------------------------ speculative decoding

    def enable_speculation(self, on: bool = True) -> None:
        """Draft one token a step with the MTP block and verify it with the next (`draft`,
        `verify`). States made before a change keep the block out of step: make new ones."""
        if on and not self.mtp:
            raise RuntimeError(
                "speculative decoding needs the checkpoint's MTP block; load it with with_mtp=True"
            )
        self.speculative = bool(on)

    @staticmethod
    def _held(x: torch.Tensor, ids: list[int], state: SequenceState):
        """The rows the MTP block has not taken, with x `[S, hc, D]` (the streams of the tokens
        `ids` just fed) after them → (rows `[n, hc, D]`, the known next tokens of all but the
        last row)."""
        if state.mtp_pending is None:
            return x, list(ids[1:])
        return torch.cat((state.mtp_pending, x)), [*state.mtp_pending_ids, *ids]

    def _feed_draft(self, x: torch.Tensor, ids: list[int], state: SequenceState) -> None:
        """After the main model took tokens `ids` (final streams x `[S, hc, D]`): the MTP block
        takes every held row whose next token is now known; the last row waits for its own."""
        rows, next_ids = self._held(x, ids, state)
        if next_ids:
            self._mtp_streams(rows[:-1], next_ids, state)
        state.mtp_pending, state.mtp_pending_ids = rows[-1:].clone(), ()

    @torch.inference_mode()
    def draft(self, token_id: int, state: SequenceState) -> torch.Tensor:
        """Logits `[V]` the MTP block gives the token after `token_id` (the next token, not fed
        yet): the block takes the held rows, the last with `token_id` as its next token."""
        if not self.speculative or state.mtp_pending is None:
            raise RuntimeError("draft needs speculation on and a state the model has prefilled")
        next_ids = [*state.mtp_pending_ids, int(token_id)]
        x = self._mtp_streams(state.mtp_pending, next_ids, state)
        state.mtp_pending, state.mtp_pending_ids = None, ()
        return self._mtp_head(x[-1:])[0]

    @torch.inference_mode()
    def verify(self, ids, state: SequenceState) -> torch.Tensor:
        """Feed the next token and its draft(s) in one call → the logits after each `[n, V]`;
        `reject_last` then takes the last one back out if it is not kept."""
        ids = self._ids(ids)
        point = state.drop_point(ids.numel())
        x = self.forward_streams(ids, state)
        rows, next_ids = self._held(x, ids.tolist(), state)
        state.mtp_pending, state.mtp_pending_ids = rows, tuple(next_ids)
        state.verify_point = point
        return self.logits_from_streams(x)

    def reject_last(self, state: SequenceState) -> None:
        """Take the last token of the `verify` call just made back out of the state."""
        if state.verify_point is None:
            raise RuntimeError("reject_last must follow verify")
        state.drop_last(state.verify_point)
        state.verify_point = None
        state.mtp_pending = state.mtp_pending[:-1]
        state.mtp_pending_ids = state.mtp_pending_ids[: state.mtp_pending.shape[0] - 1]

    # ------------------------------------------------------------------ MTP

    @torch.inference_mode()
    def mtp_logits(self, streams: torch.Tensor, next_ids, state: SequenceState) -> torch.Tensor:
        """Draft logits `[S, V]` of the MTP block: streams `[S, hc, D]` are the main model's final
        streams at positions P..P+S-1 (P = state.mtp_position), `next_ids` the tokens at
        P+1..P+S; row i predicts the token at P+i+2. Advances the MTP block's own window."""
        return self._mtp_head(self._mtp_streams(streams, next_ids, state))

    def _mtp_streams(self, streams: torch.Tensor, next_ids, state: SequenceState) -> torch.Tensor:
        """The MTP block over `mtp_logits`' rows → its output streams `[S, hc, D]` (the block's
        window advanced; no head, which a draft needs for its last row only)."""
        if not self.mtp:
            raise RuntimeError("this model was loaded without its MTP block (with_mtp=False)")
        c = self.config
        mtp = self.mtp[0]
        host_ids = self._ids(next_ids)
        ids = host_ids.to(self.device, non_blocking=True)
        start = state.mtp_position
        e = rms_norm(self._embed(host_ids), mtp.enorm, c.rms_norm_eps)
        h = rms_norm(streams, mtp.hnorm, c.rms_norm_eps)
        sim = self.numerics.simulate_quant
        x = (mtp.e_proj(e, sim).unsqueeze(1) + mtp.h_proj(h, sim)).to(self.numerics.dtype)
        x = mtp.block.forward(x, ids, start, state.mtp[0], self.numerics)
        state.mtp_position = start + ids.numel()
        return x

    def _mtp_head(self, x: torch.Tensor) -> torch.Tensor:
        """The MTP block's output streams `[n, hc, D]` → logits `[n, V]` (its hc_head and norm,
        then the shared head)."""
        c, mtp = self.config, self.mtp[0]
        out = hc_head(x, *mtp.hc_head, c.hc_eps, c.rms_norm_eps, mtp.norm)
        return self.head_logits(out)
