"""`qlite quantize --method gptq`: the calibrated part of the offline job (quant/gptq.py does
one matrix; this runs the model to get each matrix's inputs).

Calibration text (`calibration_ids`): a UTF-8 text file, or by default a fixed list of Python
standard-library sources read from the running interpreter (disjoint from the files
bench/bench_quality.py scores), each tokenized and cut into sequences of SEQ_LEN tokens, taken
from the files in turn (the first sequence of every file, then the second, ...).

The run (`gptq_layers`), one decoder layer at a time, so memory holds one layer in float32, the
calibration hidden states [S, T, D] and that layer's Hessians, never the whole model:
  1. the layer's weights are read from the source;
  2. stage by stage (STAGES: q/k/v, o_proj, gate/up or the routed experts, down_proj; GPTQ's
     "true sequential"), the calibration hidden states (the output of the already-quantized
     layers before it) go through the layer, as far as that stage, while hooks sum each of the
     stage's linears' input Hessian (linears that read the same input share one: q/k/v,
     gate/up), and each routed expert's from the tokens the router sends it; the stage's
     matrices are GPTQ'd, their packed tensors written through the checkpoint writer, and
     their weights in the layer replaced by the dequantized result, so the next stage sees
     its inputs as the quantized model computes them;
  3. the hidden states go through the quantized layer: the next layer's inputs.
lm_head (when quantized) gets the final norm's output. A routed expert that received fewer
than MIN_EXPERT_TOKENS calibration tokens is quantized without calibration (FALLBACK); the
`calibration` entry of the output's quantization section counts both kinds.
"""
from __future__ import annotations

import itertools
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from qlite.errors import QliteError
from qlite.kernels.reference import dequantize
from qlite.model import DecoderLayer, Experts, RMSNorm, expert_batches, rope_cos_sin
from qlite.quant.gptq import Hessian, gptq_quantize
from qlite.quant.swap import quantize_matrix

SEQ_LEN = 512
DEFAULT_TOKENS = 16384
BATCH_TOKENS = 4096  # calibration tokens per forward call
MIN_EXPERT_TOKENS = 128  # below this an expert's Hessian is too thin: no GPTQ for it
FALLBACK = "hqq"
# Read from the running interpreter, never copied into the repository. Disjoint from
# bench/bench_quality.py's STDLIB_FILES (tests/test_calibrate.py checks it).
STDLIB_FILES = ("typing.py", "inspect.py", "enum.py", "subprocess.py", "threading.py",
                "tarfile.py", "ast.py", "configparser.py", "statistics.py", "calendar.py",
                "logging/__init__.py", "collections/__init__.py", "tokenize.py", "shutil.py",
                "tempfile.py", "contextlib.py")
# Linears that read the same input as another: one Hessian, one GPTQ run on their stacked rows.
_SHARES_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
# True-sequential order inside a decoder layer: each stage's inputs are computed with the
# stages before it already quantized. Routed experts are one stage (their down_proj inputs
# from their own unquantized gate/up).
STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "experts"),
          ("down_proj",))


def calibration_ids(tokenizer, file=None, tokens: int = DEFAULT_TOKENS) -> tuple[torch.Tensor, str]:
    """LongTensor [S, SEQ_LEN] (S * SEQ_LEN <= tokens; a shorter text gives fewer rows) and
    a description of the text."""
    if tokens < SEQ_LEN:
        raise QliteError(f"calibration_tokens {tokens}: at least {SEQ_LEN}")
    if file is not None:
        path = Path(file).expanduser()
        try:
            texts, what = [path.read_text(encoding="utf-8")], str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise QliteError(f"calibration {path}: unreadable as UTF-8 text ({e})") from None
    else:
        root = Path(sysconfig.get_paths()["stdlib"])
        texts = [(root / f).read_text(encoding="utf-8") for f in STDLIB_FILES
                 if (root / f).is_file()]
        what = "python-stdlib"
    # Sequence j of every text before sequence j + 1 of any: the default text's files each
    # contribute, so a few thousand tokens already cover many styles of code (consecutive
    # tokens from the first files fit them, and generalize worse: bench/results/quality.md).
    chunks, count = [], 0
    for text in texts:
        ids = tokenizer.encode(text)
        count += len(ids)
        chunks.append([ids[i:i + SEQ_LEN] for i in range(0, len(ids) - SEQ_LEN + 1, SEQ_LEN)])
    rows = [c for turn in itertools.zip_longest(*chunks) for c in turn if c is not None]
    rows = rows[:tokens // SEQ_LEN]
    if not rows:
        raise QliteError(f"calibration {what}: {count} tokens, fewer than one sequence "
                         f"of {SEQ_LEN}")
    return torch.tensor(rows), what


def _load(module, prefix, sources, reader, device, dtypes):
    """Fill a meta-device module's parameters from the source checkpoint, in float32; what the
    output keeps in 16-bit (norms, biases, router) rounded as the output stores it, so the
    calibration runs the model that will be loaded."""
    state = {}
    for key, p in module.state_dict(keep_vars=True).items():
        parts = sources[prefix + key]
        if parts[0][1] is None:
            t = reader.rows(parts[0][0])
        else:  # a stacked expert tensor from per-expert ones
            t = torch.empty(p.shape, dtype=torch.float32)
            for name, index in parts:
                t[index] = reader.rows(name)
        if prefix + key in dtypes:
            t = t.to(dtypes[prefix + key])
        state[key] = t.to(device, torch.float32)
    module.load_state_dict(state, assign=True)
    return module


def _collecting_experts(experts, h_gate_up, h_down, done):
    """Experts.forward that also sums each expert's input Hessians (same output), then calls
    done()."""
    def forward(x, topk_ids, topk_weights):
        out = torch.zeros_like(x)
        for e, tokens, pairs in expert_batches(topk_ids, experts.num_experts):
            xe = x[tokens]
            h_gate_up[e].add(xe)
            gate, up = F.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
            act = F.silu(gate) * up
            h_down[e].add(act)
            out.index_add_(0, tokens, F.linear(act, experts.down_proj[e])
                           * topk_weights.flatten()[pairs, None])
        done()
        return out
    return forward


class _Job:
    """What the per-layer steps share: the writer, the format and the counters."""

    def __init__(self, q, writer, dtypes, sources, reader, device, progress):
        self.q, self.writer, self.dtypes = q, writer, dtypes
        self.sources, self.reader, self.device, self.progress = sources, reader, device, progress
        self.g, self.sym = q.group_size, q.symmetric
        self.experts_gptq = self.experts_fallback = 0

    def write(self, prefix, packed, index=None):
        for buf, t in packed.items():
            key = f"{prefix}.{buf}"
            self.writer.write(key, t.to(self.writer.where[key][4]), index)

    def gptq(self, w, hessian, name):
        qt = gptq_quantize(w, hessian, self.g, self.sym, name)
        packed = {"qweight": qt.qweight.cpu(), "scales": qt.scales.cpu()}
        if qt.zeros is not None:
            packed["zeros"] = qt.zeros.cpu()
        return packed, qt.dequantize().to(w.device)

    def fallback(self, w):
        packed = quantize_matrix(w, replace(self.q, method=FALLBACK))
        return packed, dequantize(packed["qweight"], packed["scales"], packed.get("zeros"), 4,
                                  self.g).to(w.device)

    def linears(self, layer_prefix, layer, names, hessians):
        """GPTQ the target linears `names` (relative to the layer) in groups sharing an input."""
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(_input_owner(n), []).append(n)
        for owner, members in groups.items():
            mods = [layer.get_submodule(n) for n in members]
            w = torch.cat([m.weight.data for m in mods])
            packed, deq = self.gptq(w, hessians[owner].matrix(), layer_prefix + owner)
            row = 0
            for n, m in zip(members, mods):
                rows = slice(row, row + m.out_features)
                row += m.out_features
                self.write(layer_prefix + n, {k: t[rows] if k == "qweight" else t[:, rows]
                                              for k, t in packed.items()})
                if m.bias is not None:
                    key = f"{layer_prefix}{n}.bias"
                    self.writer.write(key, m.bias.data.cpu().to(self.dtypes[key]))
                m.weight.data = deq[rows]

    def experts(self, prefix, experts, h_gate_up, h_down):
        for e in range(experts.num_experts):
            calibrated = h_gate_up[e].tokens >= MIN_EXPERT_TOKENS
            self.experts_gptq += calibrated
            self.experts_fallback += not calibrated
            for part, h in (("gate_up_proj", h_gate_up[e]), ("down_proj", h_down[e])):
                w = getattr(experts, part).data
                packed, deq = (self.gptq(w[e], h.matrix(), f"{prefix}.{part}[{e}]") if calibrated
                               else self.fallback(w[e]))
                self.write(f"{prefix}.{part}", packed, e)
                w[e] = deq


def _input_owner(name: str) -> str:
    stem, _, leaf = name.rpartition(".")
    owner = _SHARES_INPUT.get(leaf)
    return f"{stem}.{owner}" if owner else name


def _stage(name: str) -> int:
    leaf = name.rpartition(".")[2]
    return next((i for i, s in enumerate(STAGES) if leaf in s), len(STAGES))


class _Stop(Exception):
    """Ends a calibration forward once the stage's modules have had their inputs."""


class _Until:
    def __init__(self, names):
        self.names, self.seen = set(names), set()

    def __call__(self, name):
        self.seen.add(name)
        if self.seen >= self.names:
            self.seen = set()
            raise _Stop


def _calibrate_stage(job, prefix, layer, names, h, cfg, device):
    """The Hessians of one stage's linears (`names`, relative to the layer), from the layer
    whose earlier stages are already quantized, then their GPTQ."""
    hessians, hooks, experts = {}, [], None
    owners = {_input_owner(n) for n in names}
    until = _Until(owners)
    for n in owners:
        m = layer.get_submodule(n)
        if isinstance(m, Experts):
            experts = (n, m, [Hessian(m.gate_up_proj.shape[-1], device) for _ in range(m.num_experts)],
                       [Hessian(m.down_proj.shape[-1], device) for _ in range(m.num_experts)])
            m.forward = _collecting_experts(m, experts[2], experts[3], lambda n=n: until(n))
        else:
            hessians[n] = Hessian(m.in_features, device)

            def hook(mod, args, hs=hessians[n], n=n):
                hs.add(args[0])
                until(n)
            hooks.append(m.register_forward_pre_hook(hook))
    try:
        _forward(layer, h, cfg, device, keep=False)  # the output is not needed
    finally:
        for hook in hooks:
            hook.remove()
        if experts is not None:
            del experts[1].forward
    job.linears(prefix, layer, [n for n in names if experts is None or n != experts[0]],
                hessians)
    if experts is not None:
        job.experts(prefix + experts[0], *experts[1:])


def _forward(layer, h, cfg, device, keep=True):
    """h [S, T, D] through one decoder layer, BATCH_TOKENS at a time; in place if `keep`,
    else until a hook raises _Stop."""
    s, t, _ = h.shape
    step = max(1, BATCH_TOKENS // t)
    pos = torch.arange(t, device=device)[None]
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    for i in range(0, s, step):
        try:
            y = layer(h[i:i + step], cos, sin, None, None)
        except _Stop:
            continue
        if keep:
            h[i:i + step] = y


@torch.no_grad()
def gptq_layers(cfg, targets: set[str], q, sources, reader, writer, dtypes,
                ids: torch.Tensor, progress=None) -> tuple[set[str], dict]:
    """Run GPTQ over the decoder layers (and lm_head if it is in `targets`), writing every
    packed tensor and linear bias it quantizes; return the target names done and the
    quantization section's `calibration` counts. `progress(done, total)` counts matrices."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    job = _Job(q, writer, dtypes, sources, reader, device, progress)
    done: set[str] = set()
    emb = reader.rows(sources["model.embed_tokens.weight"][0][0]).float()
    if "model.embed_tokens" in targets:  # quantized first: the layers see what will be loaded
        packed, emb = job.fallback(emb)
        job.write("model.embed_tokens", packed)
        done.add("model.embed_tokens")
    elif "model.embed_tokens.weight" in dtypes:
        emb = emb.to(dtypes["model.embed_tokens.weight"]).float()
    h = emb[ids].to(device, torch.float32)  # [S, T, D]
    del emb
    total = cfg.num_hidden_layers + ("lm_head" in targets)
    t0 = time.monotonic()
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        with torch.device("meta"):
            layer = DecoderLayer(cfg, i)
        _load(layer, prefix, sources, reader, device, dtypes)
        names = [n for n, _ in layer.named_modules() if prefix + n in targets]
        for stage in sorted({_stage(n) for n in names}):  # 1-2 for each stage in turn
            _calibrate_stage(job, prefix, layer, [n for n in names if _stage(n) == stage],
                             h, cfg, device)
        _forward(layer, h, cfg, device)  # 3: through the quantized layer
        done.update(prefix + n for n in names)
        del layer
        if progress:
            progress(i + 1, total, time.monotonic() - t0)
    if "lm_head" in targets:
        with torch.device("meta"):
            norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        _load(norm, "model.norm.", sources, reader, device, dtypes)
        hess, step = Hessian(cfg.hidden_size, device), max(1, BATCH_TOKENS // h.shape[1])
        for i in range(0, h.shape[0], step):
            hess.add(norm(h[i:i + step]))
        del h
        w = reader.rows(sources["lm_head.weight"][0][0]).to(device, torch.float32)
        packed, _ = job.gptq(w, hess.matrix(), "lm_head")
        job.write("lm_head", packed)
        done.add("lm_head")
        if progress:
            progress(total, total, time.monotonic() - t0)
    stats = {"text": None, "tokens": int(ids.numel()), "sequence_length": int(ids.shape[1])}
    if job.experts_gptq + job.experts_fallback:
        stats.update(experts_gptq=job.experts_gptq, experts_fallback=job.experts_fallback,
                     fallback_method=FALLBACK, min_expert_tokens=MIN_EXPERT_TOKENS)
    return done, stats
