import struct, zlib, random, sys, os
def png(path, w, h, color_type, depth, rows):
    def chunk(t, d):
        c = struct.pack(">I", len(d)) + t + d
        return c + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    raw = b"".join(b"\x00" + r for r in rows)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))
    if color_type == 3:
        data += chunk(b"PLTE", bytes(range(12)))
    data += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    open(path, "wb").write(data)
out = sys.argv[1]
rng = random.Random(7)
os.makedirs(out, exist_ok=True)
for i in range(16):
    png(f"{out}/{i:03}.png", 8, 8, 0, 8, [bytes(rng.randrange(256) for _ in range(8)) for _ in range(8)])
