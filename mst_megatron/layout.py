"""The parallel layout of a run and the arithmetic that follows from it; no megatron-core import.

One :class:`ParallelLayout` is validated once, when it is built, and raises :class:`LayoutError`
naming the Megatron-LM flag at fault (the flags map one to one onto ``TransformerConfig`` fields:
``--tensor-model-parallel-size`` is ``tensor_model_parallel_size``). The pretraining job, the
launcher, the planner, the simulator, :func:`mst_megatron.init_parallel` and the modules all ask it.
The MST chunk-count rules live here too, as functions of plain numbers, so the planner can price a
layout without building a model.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from mst_megatron.ops.chunking import ChunkCount, local_chunk_count

CP_COMM_TYPES = ("a2a", "p2p", "a2a+p2p")
TP, PP, CP = "--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--context-parallel-size"
VPP, HCP = "--virtual-pipeline-model-parallel-size", "--hierarchical-context-parallel-sizes"


class LayoutError(ValueError):
    """A parallel layout that cannot run; the message names the flag and the allowed values."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LayoutError(message)


def _is_degree(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of tensor (``tp``), pipeline (``pp``, ``vpp`` virtual stages per rank or None),
    context (``cp``, exchanged by ``cp_comm_type``) and data (``dp``) parallelism, and whether
    sequence parallelism (``sp``) shards the TP group's activations.

    ``hierarchical_cp_sizes`` is ``(all-to-all size, ring size)`` with product ``cp``, given exactly
    when ``cp_comm_type`` is ``"a2a+p2p"``. The world is ``tp * pp * cp * dp`` ranks.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    vpp: Optional[int] = None
    sp: bool = False
    cp_comm_type: str = "a2a"
    hierarchical_cp_sizes: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        for flag, value in ((TP, self.tp), (PP, self.pp), (CP, self.cp), ("data-parallel size", self.dp)):
            _require(_is_degree(value), f"{flag} must be an int >= 1, got {value!r}")
        if self.vpp is not None:
            _require(_is_degree(self.vpp), f"{VPP} must be None or an int >= 1, got {self.vpp!r}")
            _require(self.pp > 1 or self.vpp == 1,
                     f"{VPP} {self.vpp} > 1 needs {PP} > 1, got {PP} {self.pp}")
        _require(not self.sp or self.tp > 1, f"--sequence-parallel needs {TP} > 1")
        _require(self.cp_comm_type in CP_COMM_TYPES,
                 f"--cp-comm-type must be one of {CP_COMM_TYPES}, got {self.cp_comm_type!r}")
        sizes = self.hierarchical_cp_sizes
        if self.cp_comm_type != "a2a+p2p":
            _require(sizes is None, f"{HCP} needs --cp-comm-type a2a+p2p")
            return
        pairs = [[a, self.cp // a] for a in range(2, self.cp) if self.cp % a == 0]
        _require(sizes is not None and len(sizes) == 2 and all(_is_degree(n) for n in sizes)
                 and sizes[0] * sizes[1] == self.cp,
                 f"--cp-comm-type a2a+p2p: {HCP} {None if sizes is None else list(sizes)} must be two sizes "
                 f"(all-to-all, ring) whose product is {CP} {self.cp}; possible: {pairs or 'none'}")
        object.__setattr__(self, "hierarchical_cp_sizes", tuple(sizes))

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, world: str = "",
                  **options) -> "ParallelLayout":
        """The layout of ``world_size`` ranks; the data-parallel size is what TP x PP x CP leaves.
        ``world`` names the world in the error (default: ``"world size N"``)."""
        for flag, value in ((TP, tp), (PP, pp), (CP, cp)):
            _require(_is_degree(value), f"{flag} must be an int >= 1, got {value!r}")
        model = tp * pp * cp
        _require(world_size % model == 0,
                 f"{world or f'world size {world_size}'} is not divisible by {TP} ({tp}) x {PP} ({pp}) x "
                 f"{CP} ({cp}) = {model}")
        return cls(tp=tp, pp=pp, cp=cp, dp=world_size // model, **options)

    @classmethod
    def for_cluster(cls, nodes: int, gpus_per_node: int, tp: int = 1, pp: int = 1, cp: int = 1,
                    **options) -> "ParallelLayout":
        """:meth:`for_world` on ``nodes`` x ``gpus_per_node`` GPUs, with TP inside a node (its
        all-reduces need the node's links)."""
        for name, value in (("nodes", nodes), ("GPUs per node", gpus_per_node)):
            _require(_is_degree(value), f"{name} must be an int >= 1, got {value!r}")
        _require(not _is_degree(tp) or gpus_per_node % tp == 0,
                 f"{TP} {tp} must divide the {gpus_per_node} GPUs per node: tensor parallelism stays within a "
                 f"node; use one of {divisors(gpus_per_node)}")
        world = nodes * gpus_per_node
        return cls.for_world(world, tp, pp, cp, world=f"{nodes} nodes x {gpus_per_node} GPUs = {world} GPUs",
                             **options)

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp_size(self) -> int:
        """Ranks that share one CP rank's tokens: ``tp`` under sequence parallelism, else 1."""
        return self.tp if self.sp else 1

    @property
    def a2a_size(self) -> int:
        """Ranks of the all-to-all around attention: ``cp`` for "a2a", 1 for the ring "p2p"."""
        return {"a2a": self.cp, "p2p": 1, "a2a+p2p": (self.hierarchical_cp_sizes or (1,))[0]}[self.cp_comm_type]

    @property
    def ring_size(self) -> int:
        """Ranks of the key/value ring: ``cp`` for "p2p", 1 for "a2a"."""
        return self.cp // self.a2a_size

    @property
    def seq_len_divisor(self) -> int:
        """What every sequence length must divide by: CP's load-balanced layout cuts it into
        ``2 * cp`` pieces, and sequence parallelism shards each CP rank's tokens over ``tp``."""
        return math.lcm(2 * self.cp if self.cp > 1 else 1, self.cp * self.sp_size)

    def padded_vocab_size(self, vocab_size: int, divisible_by: int = 128) -> int:
        """Megatron-LM's padding: a multiple of ``divisible_by * tp``, so every TP shard is equal."""
        multiple = divisible_by * self.tp
        return math.ceil(vocab_size / multiple) * multiple

    def check_seq_length(self, seq_length: int) -> None:
        """Raise unless ``seq_length`` splits as :attr:`seq_len_divisor` requires."""
        _require(self.cp == 1 or seq_length % (2 * self.cp) == 0,
                 f"{CP} {self.cp}: --seq-length {seq_length} must be divisible by 2 x {CP} = {2 * self.cp} "
                 "(megatron's load-balanced sequence layout)")
        _require(not self.sp or seq_length % (self.tp * self.cp) == 0,
                 f"--sequence-parallel: --seq-length {seq_length} must be divisible by {TP} {self.tp} x {CP} "
                 f"{self.cp}")

    def check_heads(self, num_attention_heads: int, num_query_groups: int) -> None:
        """Raise unless TP divides the heads and key/value groups, and the all-to-all part of CP
        (which trades sequence shards for head shards) divides the heads per TP rank and divides, or
        is divided by, the groups per TP rank; the ring has no such condition."""
        for name, value in (("num_attention_heads", num_attention_heads), ("num_query_groups", num_query_groups)):
            _require(value % self.tp == 0, f"the model's {name} ({value}) is not divisible by {TP} {self.tp}")
        a2a = self.a2a_size
        if a2a == 1:
            return
        what = f"{CP} {a2a}" if a2a == self.cp else f"{HCP}[0] (the all-to-all part) {a2a}"
        heads, groups = num_attention_heads // self.tp, num_query_groups // self.tp
        _require(heads % a2a == 0,
                 f"{what}: the attention heads per tensor-parallel rank (num_attention_heads {num_attention_heads} "
                 f"/ {TP} {self.tp} = {heads}) must be divisible by it; --cp-comm-type p2p (the ring) has no "
                 "such condition")
        _require(groups % a2a == 0 or a2a % groups == 0,
                 f"{what}: the key/value groups per tensor-parallel rank (num_query_groups {num_query_groups} / "
                 f"{TP} {self.tp} = {groups}) must be divisible by it or divide it; --cp-comm-type p2p (the ring) "
                 "has no such condition")

    def kv_replication(self, num_query_groups: int) -> int:
        """How many all-to-all ranks share one key/value group (1 when the groups divide evenly)."""
        return max(1, self.a2a_size // (num_query_groups // self.tp))

    def check_layers(self, num_layers: int) -> None:
        """Raise unless the pipeline stages (and their virtual stages) split the layers evenly."""
        _require(num_layers % self.pp == 0,
                 f"the model's num_layers ({num_layers}) is not divisible by {PP} {self.pp}")
        per_stage = num_layers // self.pp
        _require(self.vpp is None or per_stage % self.vpp == 0,
                 f"{VPP} {self.vpp} does not divide the {per_stage} layers of each pipeline stage")


def mlp_chunk_count(mlp_mini_sequences: ChunkCount, local_length: int, sp_size: int, hidden_size: int) -> int:
    """Chunks of the MLP for ``local_length`` tokens per rank (``sp_size``: :attr:`ParallelLayout.sp_size`).

    ``"auto"``: chunks of about ``hidden_size`` gathered tokens, so a chunk's ``[tokens, ffn]``
    intermediates are about the size of the hidden state. Equal on every rank of a TP/SP/CP group.
    """
    return local_chunk_count(mlp_mini_sequences, "mlp_mini_sequences", local_length, sp_size,
                             auto_tokens_per_chunk=hidden_size)


def head_chunk_count(lm_head_mini_sequences: ChunkCount, local_tokens: int, sp_size: int, hidden_size: int,
                     vocab_per_rank: int) -> int:
    """Chunks of the LM head + cross-entropy for ``local_tokens`` tokens per rank.

    ``"auto"``: ``ceil(vocab_per_rank / hidden_size)`` chunks, so a chunk's logits hold about as many
    numbers as the gathered hidden state, but at least ``hidden_size / 4`` gathered tokens each
    (each chunk streams the whole weight; below that the logits GEMMs slow down).
    """
    num_tokens = local_tokens * sp_size
    tokens_per_chunk = max(-(-hidden_size // 4), -(-num_tokens * hidden_size // vocab_per_rank))
    return local_chunk_count(lm_head_mini_sequences, "lm_head_mini_sequences", local_tokens, sp_size,
                             auto_tokens_per_chunk=tokens_per_chunk)

