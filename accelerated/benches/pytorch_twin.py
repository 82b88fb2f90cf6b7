"""PyTorch eager twin of the ddpm crate's U-Net, LAMB, EMA and samplers, for the
`versus_pytorch` bench.

It mirrors accelerated/src/unet.rs, lamb.rs, ema.rs, marginal.rs, loss.rs and sampler.rs op for
op (same layers, same parameter names, same per-parameter LAMB arithmetic, same gathers from the
f64 schedule tables in training, same host-scalar coefficients per sampler step, bf16 autocast
around the same calls), so that the two sides do the same work and only the framework around the
kernels differs. It is a worker: the bench binary starts it, writes the spec as the first line
on stdin (JSON, with the schedule tables and the step lists computed by the Rust side), reads one
"ready" JSON line, then sends one phase name a line (`train`; `trainer`, the same loop timed
against the Rust product's trainer; `strided`; `ancestral`; `optim`, the LAMB step and EMA update
alone on the warm-up's gradients; `quit`) and reads one JSON line of
measurements for each.
"""

import copy
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    """h = x + W_t·temb; h = GN(swish(conv1(h))); dropout; h = swish(conv2(h)); GN(h + skip(x))."""

    def __init__(self, cfg, c_in, c_out):
        super().__init__()
        self.time_proj = nn.Linear(time_dim(cfg), c_in, bias=False)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(cfg["groups"], c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(cfg["groups"], c_out), c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.dropout = cfg["dropout"]

    def forward(self, x, temb, train):
        shift = self.time_proj(temb).unsqueeze(-1).unsqueeze(-1)
        h = self.norm1(F.silu(self.conv1(x + shift)))
        h = F.dropout(h, self.dropout, train and self.dropout > 0.0)
        h = F.silu(self.conv2(h))
        skip = self.skip(x) if self.skip is not None else x
        return self.norm2(h + skip)


def time_dim(cfg):
    return cfg["base_channels"] * (4 if cfg["time_embedding"] == "sinusoidal" else 1)


class TimeNet(nn.Module):
    """Learned Embedding(T, base), or sinusoidal features → Linear → swish → Linear."""

    def __init__(self, cfg):
        super().__init__()
        c = cfg["base_channels"]
        self.learned = cfg["time_embedding"] == "learned"
        if self.learned:
            self.embedding = nn.Embedding(cfg["t_max"], c)
        else:
            self.half = c // 2
            self.mlp1 = nn.Linear(c, 4 * c)
            self.mlp2 = nn.Linear(4 * c, 4 * c)

    def forward(self, t, kind):
        if self.learned:
            return self.embedding(t - 1)
        # At least f32, as unet.rs: bfloat16 rounds t = 999 to 1000.
        exact = torch.float32 if kind in (torch.bfloat16, torch.float16) else kind
        i = torch.arange(self.half, dtype=exact, device=t.device)
        freq = (i * (-math.log(10000.0) / self.half)).exp()
        args = t.to(exact).unsqueeze(1) * freq.unsqueeze(0)
        feats = torch.cat([args.sin(), args.cos()], 1).to(kind)
        return self.mlp2(F.silu(self.mlp1(feats)))


class UNet(nn.Module):
    """The article's U-Net without attention, laid out exactly as unet.rs."""

    def __init__(self, cfg):
        super().__init__()
        chans = [m * cfg["base_channels"] for m in cfg["channel_mults"]]
        n = cfg["blocks_per_level"]
        c0 = chans[0]
        self.time = TimeNet(cfg)
        self.conv_in = nn.Conv2d(cfg["in_channels"], c0, 3, padding=1)
        c = c0
        self.down = nn.ModuleList()
        for c_level in chans:
            blocks = nn.ModuleList()
            for _ in range(n):
                blocks.append(ResBlock(cfg, c, c_level))
                c = c_level
            self.down.append(blocks)
        self.mid = ResBlock(cfg, c, c)
        # unet.rs names the up levels by their level index (last level first); ModuleList
        # numbers them in order, which changes names only, not the arithmetic.
        self.up = nn.ModuleList()
        for c_level in reversed(chans):
            blocks = nn.ModuleList()
            for _ in range(n):
                blocks.append(ResBlock(cfg, c, c_level))
                c = c_level
            self.up.append(blocks)
        self.norm_out = nn.GroupNorm(min(cfg["groups"], c0), c0)
        self.conv_out = nn.Conv2d(c0, cfg["in_channels"], 3, padding=1)

    def forward(self, x_t, t, train):
        kind = self.conv_in.weight.dtype
        x = x_t.to(kind)
        temb = self.time(t, kind)
        h0 = self.conv_in(x)
        skips = []
        h = h0
        last = len(self.down) - 1
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, temb, train)
                skips.append(h)
            if level != last:
                h = F.avg_pool2d(h, 2, 2, 0, False, True)
        h = self.mid(h, temb, train)
        for i, blocks in enumerate(self.up):
            for block in blocks:
                h = block(h, temb, train) + skips.pop()
            if i != last:
                h = F.interpolate(h, size=(2 * h.shape[2], 2 * h.shape[3]), mode="nearest")
        out = self.conv_out(self.norm_out(h + h0))
        return out.to(x_t.dtype)


def is_adapted(name, p):
    """lamb.rs's rule: adapt every variable of dimension > 1 that is not a bias or a norm."""
    parts = name.split(".")
    return p.dim() > 1 and parts[-1] != "bias" and not any(c.startswith("norm") for c in parts)


class Lamb:
    """lamb.rs's LAMB, op for op: per-parameter moments, trust ratio on adapted parameters,
    and the global gradient norm (f64) that the Rust step returns for logging."""

    def __init__(self, model, cfg):
        self.cfg = cfg
        self.k = 0
        self.slots = []
        for name, p in sorted(model.named_parameters()):
            m = torch.zeros_like(p).detach()
            v = torch.zeros_like(p).detach()
            self.slots.append((p, m, v, is_adapted(name, p)))

    def zero_grad(self):
        # tch's zero_grad zeroes each defined gradient in place (it does not drop it).
        for p, _, _, _ in self.slots:
            if p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()

    @torch.no_grad()
    def step(self):
        c = self.cfg
        squares = [p.grad.norm().to(torch.float64).square() for p, _, _, _ in self.slots if p.grad is not None]
        norm = torch.stack(squares, 0).sum(dtype=torch.float64).sqrt()
        self.k += 1
        b1, b2 = c["beta1"], c["beta2"]
        for p, m, v, adapt in self.slots:
            g = p.grad
            if g is None:
                continue
            m.mul_(b1).add_(g * (1.0 - b1))
            v.mul_(b2).add_(g.square() * (1.0 - b2))
            m_hat = m / (1.0 - b1 ** self.k)
            v_hat = v / (1.0 - b2 ** self.k)
            update = m_hat / (v_hat.sqrt() + c["eps"])
            if adapt:
                if c["weight_decay"] != 0.0:
                    update = update + p * c["weight_decay"]
                w_norm = p.norm()
                u_norm = update.norm()
                both = w_norm.gt(0.0).logical_and(u_norm.gt(0.0))
                ratio = torch.where(both, w_norm / u_norm, 1.0)
                update = update * ratio
            p.sub_(update * c["lr"])
        return norm


class ForeachLamb(Lamb):
    """The same LAMB arithmetic with PyTorch's multi-tensor `_foreach_*` kernels (a handful of
    launches per step instead of ~15 per parameter). Not what the Rust side does — tch has no
    foreach bindings — but it measures what a multi-tensor LAMB would gain (`--twin-foreach`)."""

    def zero_grad(self):
        grads = [p.grad for p, _, _, _ in self.slots if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    @torch.no_grad()
    def step(self):
        c = self.cfg
        live = [(p, m, v, a) for p, m, v, a in self.slots if p.grad is not None]
        params = [p for p, _, _, _ in live]
        grads = [p.grad for p in params]
        ms = [m for _, m, _, _ in live]
        vs = [v for _, _, v, _ in live]
        norm = torch.stack(torch._foreach_norm(grads)).to(torch.float64).square().sum().sqrt()
        self.k += 1
        b1, b2 = c["beta1"], c["beta2"]
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, grads, alpha=1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
        m_hat = torch._foreach_div(ms, 1.0 - b1 ** self.k)
        denom = torch._foreach_sqrt(torch._foreach_div(vs, 1.0 - b2 ** self.k))
        torch._foreach_add_(denom, c["eps"])
        update = torch._foreach_div(m_hat, denom)
        adapted = [i for i, (_, _, _, a) in enumerate(live) if a]
        if adapted:
            upd_a = [update[i] for i in adapted]
            par_a = [params[i] for i in adapted]
            if c["weight_decay"] != 0.0:
                torch._foreach_add_(upd_a, par_a, alpha=c["weight_decay"])
            w_norm = torch.stack(torch._foreach_norm(par_a))
            u_norm = torch.stack(torch._foreach_norm(upd_a))
            ratio = torch.where(w_norm.gt(0.0).logical_and(u_norm.gt(0.0)), w_norm / u_norm, 1.0)
            torch._foreach_mul_(upd_a, list(ratio.unbind(0)))
        torch._foreach_add_(params, update, alpha=-c["lr"])
        return norm


class Ema:
    """ema.rs: w̄ ← lerp(w̄, w, 1 − d), d = min(decay, (1 + k)/(10 + k)) with warm-up."""

    def __init__(self, model, decay):
        self.decay = decay
        self.k = 0
        self.pairs = [(p.detach().clone(), p) for _, p in sorted(model.named_parameters())]

    @torch.no_grad()
    def update(self, foreach=False):
        d = min(self.decay, (1.0 + self.k) / (10.0 + self.k))
        if foreach:
            torch._foreach_lerp_([a for a, _ in self.pairs], [w for _, w in self.pairs], 1.0 - d)
        else:
            for avg, w in self.pairs:
                avg.lerp_(w, 1.0 - d)
        self.k += 1


class Schedule:
    """The Rust side's f64 tables (α, β, ᾱ, β̄, σ), index 0 the identity: all on the host (Python
    floats, i.e. f64) for the sampler's coefficients, ᾱ and β̄ on the device for training."""

    def __init__(self, spec, device):
        tables = spec["tables"]
        self.host = tables
        f64 = dict(dtype=torch.float64, device=device)
        self.alpha_bar = torch.tensor(tables["alpha_bar"], **f64)
        self.beta_bar = torch.tensor(tables["beta_bar"], **f64)
        self.t_max = len(tables["alpha"]) - 1


def gather(table, t, like):
    """schedule.rs's gather: table[t] as like's kind and device, shaped [B, 1, …, 1]."""
    shape = [1] * max(like.dim(), 1)
    shape[0] = t.shape[0]
    return table.index_select(0, t.to(table.device)).to(like.dtype).to(like.device).view(shape)


def ancestral_update(h, k):
    """sampler.rs's Update::ancestral, unclipped, at chain index k (host f64):
    x′ = (1/α_k) x − ((β_k²/β̄_k)/α_k) ε̂ + σ_k z."""
    a, b, bb = h["alpha"][k], h["beta"][k], h["beta_bar"][k]
    return 1.0 / a, -(b * b / bb) / a, h["sigma"][k]


def ddim_update(h, t, t_prev, eta):
    """sampler.rs's Update::ddim, unclipped (host f64): x′ = (ᾱ_τ′/ᾱ_τ) x +
    (keep − ᾱ_τ′ β̄_τ/ᾱ_τ) ε̂ + σ z."""
    ab, bb = h["alpha_bar"][t], h["beta_bar"][t]
    ab_prev, bb_prev = h["alpha_bar"][t_prev], h["beta_bar"][t_prev]
    r = ab / ab_prev
    ratio = 1.0 - r * r
    sigma = bb_prev / bb * math.sqrt(max(ratio, 0.0)) * eta
    keep = math.sqrt(max(bb_prev * bb_prev - sigma * sigma, 0.0))
    return ab_prev / ab, keep - ab_prev * bb / ab, sigma


def host_updates(s, pairs, eta):
    """sampler.rs's Sampler::host_updates: one (c_x, c_ε, σ) per step, computed once before the
    loop; the ancestral step is indexed by k = n − i on its (here unrespaced) chain."""
    total = len(pairs)
    if eta is None:
        return [ancestral_update(s.host, total - i) for i in range(total)]
    return [ddim_update(s.host, t, t_prev, eta) for t, t_prev in pairs]


@torch.no_grad()
def sample(model, pairs, updates, shape, device, bf16):
    """sampler.rs's loop: x_T ~ N(0, I), one host-scalar update per (τ, τ′), bf16 autocast around
    the network only, no final noise, clip the result."""
    b = shape[0]
    x = torch.randn(shape, dtype=torch.float32, device=device)
    for (t, t_prev), (c_x, c_eps, sigma) in zip(pairs, updates):
        t_vec = torch.full([b], t, dtype=torch.int64, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eps_hat = model(x, t_vec, False)
        eps_hat = eps_hat.to(x.dtype)
        mean = x * c_x + eps_hat * c_eps
        if t_prev > 0:
            x = mean + torch.randn(shape, dtype=torch.float32, device=device) * sigma
        else:
            x = mean
    return x.clamp(-1.0, 1.0)


def read_hwm_bytes():
    """Peak resident set size (VmHWM) of this process since the last reset."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def cpu_seconds():
    """CPU time (user + system, all threads) of this process from /proc/self/stat, in the same
    clock ticks of 1/100 s that the Rust side reads."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def reset_hwm():
    """Resets VmHWM to the current RSS (Linux ≥ 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Worker:
    def __init__(self, spec):
        self.spec = spec
        self.device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = spec["cudnn_benchmark"]
        if spec.get("seed") is not None:
            torch.manual_seed(spec["seed"])
        self.bf16 = spec["precision"] == "bf16"
        cfg = spec["model"]
        self.cfg = cfg
        self.model = UNet(cfg).to(self.device)
        self.memory_format = torch.channels_last if spec["channels_last"] else torch.contiguous_format
        if spec["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        # --bf16-weights: the samplers run a copy cast to bfloat16 once, without autocast.
        self.bf16_weights = bool(spec.get("bf16_weights"))
        self.sample_model = copy.deepcopy(self.model).to(torch.bfloat16) if self.bf16_weights else self.model
        self.foreach = bool(spec.get("twin_foreach"))
        self.lamb = (ForeachLamb if self.foreach else Lamb)(self.model, spec["lamb"])
        self.ema = Ema(self.model, spec["ema_decay"])
        self.schedule = Schedule(spec, self.device)
        self.updates = {
            "strided": host_updates(self.schedule, spec["strided_pairs"], 1.0),
            "ancestral": host_updates(self.schedule, spec["ancestral_pairs"], None),
            "warmup": host_updates(self.schedule, spec["warmup_pairs"], 1.0),
        }
        size = cfg["image_size"]
        self.image = [cfg["in_channels"], size, size]
        batch = spec["train_batch"]
        x0 = torch.rand([batch] + self.image, device=self.device) * 2.0 - 1.0
        self.x0 = x0.contiguous(memory_format=self.memory_format)

    def train_step(self):
        x0 = self.x0
        t = torch.randint(1, self.schedule.t_max + 1, [x0.shape[0]], dtype=torch.int64, device=self.device)
        eps = torch.randn_like(x0)
        x_t = gather(self.schedule.alpha_bar, t, x0) * x0 + gather(self.schedule.beta_bar, t, x0) * eps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            eps_hat = self.model(x_t, t, True)
            loss = (eps - eps_hat).square().sum(dim=list(range(1, eps.dim()))).mean()
        self.lamb.zero_grad()
        loss.backward()
        self.lamb.step()
        self.ema.update(self.foreach)

    def run_sampler(self, name, images):
        pairs = self.spec[f"{name}_pairs"]
        shape = [images] + self.image
        autocast = self.bf16 and not self.bf16_weights
        return sample(self.sample_model, pairs, self.updates[name], shape, self.device, autocast)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def warm_up(self):
        for _ in range(self.spec["warmup_steps"]):
            self.train_step()
        for images in {self.spec["strided_images"], self.spec["ancestral_images"]}:
            if images > 0:
                self.run_sampler("warmup", images)
        self.sync()

    def phase(self, name):
        s = self.spec
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        hwm_reset = reset_hwm()
        self.sync()
        cpu_start = cpu_seconds()
        start = time.perf_counter()
        if name in ("train", "trainer"):
            for _ in range(s["train_steps"]):
                self.train_step()
            images = s["train_steps"] * s["train_batch"]
        elif name == "optim":
            # The optimiser alone on the gradients the warm-up left; "images" counts steps.
            for _ in range(s["optim_steps"]):
                self.lamb.step()
                self.ema.update(self.foreach)
            images = s["optim_steps"]
        else:
            images = s[f"{name}_images"]
            self.run_sampler(name, images)
        self.sync()
        seconds = time.perf_counter() - start
        out = {
            "phase": name,
            "seconds": seconds,
            "cpu_seconds": cpu_seconds() - cpu_start,
            "images": images,
            "peak_rss_bytes": read_hwm_bytes(),
            "rss_peak_is_per_phase": hwm_reset,
        }
        if self.device.type == "cuda":
            out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        return out

    def ready(self):
        params = list(self.model.named_parameters())
        info = {
            "ready": True,
            "side": "pytorch",
            "parameters": sum(p.numel() for _, p in params),
            "adapted_parameters": sum(p.numel() for n, p in params if is_adapted(n, p)),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "foreach_optimiser": self.foreach,
        }
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(0)
        return info


def main():
    spec = json.loads(sys.stdin.readline())
    worker = Worker(spec)
    worker.warm_up()
    print(json.dumps(worker.ready()), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            break
        if name not in ("train", "trainer", "strided", "ancestral", "optim"):
            print(json.dumps({"error": f"unknown phase {name!r}"}), flush=True)
            continue
        print(json.dumps(worker.phase(name)), flush=True)


if __name__ == "__main__":
    main()
