"""Writes the fuzz targets' seed corpora under fuzz/seeds/<target>/ from real files.

Usage (from the repository root, after `cargo build --release`):
    python3 fuzz/seeds/make_pngs.py /tmp/fuzz-seeds/images
    sed 's|path = "images"|path = "/tmp/fuzz-seeds/images"|' fuzz/seeds/tiny.toml > /tmp/fuzz-seeds/tiny.toml
    target/release/ddpm train --config /tmp/fuzz-seeds/tiny.toml --out /tmp/fuzz-seeds/run
    python3 fuzz/seeds/make_seeds.py /tmp/fuzz-seeds
The images are the tiny run's 8x8 grey PNGs and a few others made here (RGB, palette,
16-bit, grey+alpha), the checkpoint and config are the tiny run's, the MNIST rows are the
first rows of data/mnist_5k.csv.gz. python.png / python.jpg come from CPython's test data
(Lib/test/imghdrdata), if present.
"""
import glob, gzip, json, os, shutil, sys, tomllib, zlib, struct

work = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
PART = b"\n@@PART@@\n"

def seed(target, name, data):
    d = os.path.join(here, target)
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, name), "wb").write(data)

# config: mode byte, then text
tiny = open(os.path.join(here, "tiny.toml"), "rb").read()
saved = open(os.path.join(work, "run", "config.toml"), "rb").read()
seed("config", "tiny-toml", b"\x00" + tiny)
seed("config", "saved-toml", b"\x00" + saved)
seed("config", "empty-toml", b"\x00")
seed("config", "cifar-toml", b"\x00" + b'preset = "cifar32"\n[train]\nsteps = 10\n')
seed("config", "sigma-toml", b"\x00" + b'[sample]\nsigma = { kind = "isotropic", data_std = 0.5 }\nsteps = 50\n[train]\nlr_decay = [{ step = 200, factor = 0.5 }]\n')
as_json = json.dumps(tomllib.loads(saved.decode())).encode()
seed("config", "saved-json", b"\x01" + as_json)
seed("config", "tiny-json", b"\x01" + json.dumps(tomllib.loads(tiny.decode())).encode())
seed("config", "layered", b"\x02" + tiny + PART + b"[train]\nsteps = 5\nlr = 0.001\n[diffusion]\nt_max = 8\n")
seed("config", "layered-preset", b"\x02" + PART + b"[sample]\nn = 3\n[train]\nsteps = 2000\n")

# manifest and checkpoint: the tiny run's checkpoint
ckpt = sorted(glob.glob(os.path.join(work, "run", "checkpoints", "step-*")))[-1]
read = lambda f: open(os.path.join(ckpt, f), "rb").read()
manifest = read("manifest.json")
seed("manifest", "tiny", manifest)
m = json.loads(manifest)
m["format_version"] = 2
seed("manifest", "version-2", json.dumps(m).encode())
m = json.loads(manifest)
m["step"] = 1
seed("manifest", "step-1", json.dumps(m).encode())
files = [manifest] + [read(f) for f in ["model.safetensors", "ema.safetensors", "optim.safetensors", "config.toml"]]
whole = PART.join(files)
seed("checkpoint", "fixed-sums", b"\x03" + whole)
seed("checkpoint", "fixed-sums-ema", b"\x07" + whole)
seed("checkpoint", "as-written", b"\x02" + whole)
seed("checkpoint", "no-sidecar", b"\x01" + whole)

# image: choice byte (side-1 in bits 0-4, RGB in bit 5, .jpg in bit 6), then the file
for i, p in enumerate(sorted(glob.glob(os.path.join(work, "images", "*.png")))[:3]):
    seed("image", f"grey8-{i}", bytes([7 | (32 if i == 1 else 0)]) + open(p, "rb").read())
def png(w, h, color_type, depth, rows, plte=b""):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    raw = b"".join(b"\x00" + r for r in rows)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    if plte:
        out += chunk(b"PLTE", plte)
    return out + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
seed("image", "rgb-12x10", bytes([32 | 7]) + png(12, 10, 2, 8, [bytes((x * 20 + y) % 256 for x in range(36)) for y in range(10)]))
seed("image", "palette-9x9", bytes([8]) + png(9, 9, 3, 8, [bytes((x + y) % 4 for x in range(9)) for y in range(9)], bytes(range(12))))
seed("image", "grey16-10x10", bytes([4]) + png(10, 10, 0, 16, [bytes((x * 7) % 256 for x in range(20)) for y in range(10)]))
seed("image", "greyalpha-8x8", bytes([32 | 3]) + png(8, 8, 4, 8, [bytes(range(16)) for y in range(8)]))
for name in ["python.png", "python.jpg"]:
    found = glob.glob(f"/root/.pyenv/versions/*/lib/python3*/test/imghdrdata/{name}") + glob.glob(f"/usr/lib/python3*/test/imghdrdata/{name}")
    if found:
        jpg = 64 if name.endswith("jpg") else 0
        seed("image", name, bytes([jpg | 32 | 7]) + open(found[0], "rb").read())

# mnist_csv: flag byte (bit 0 gzip, bit 1 pad to 32), then the file
root = os.path.dirname(os.path.dirname(here))
with gzip.open(os.path.join(root, "data", "mnist_5k.csv.gz"), "rb") as f:
    rows = [f.readline() for _ in range(3)]
seed("mnist_csv", "plain-1", b"\x00" + rows[0])
seed("mnist_csv", "plain-3-pad", b"\x02" + b"".join(rows))
seed("mnist_csv", "gz-2", b"\x01" + gzip.compress(b"".join(rows[:2]), mtime=0))
seed("mnist_csv", "gz-1-pad", b"\x03" + gzip.compress(rows[0], mtime=0))
