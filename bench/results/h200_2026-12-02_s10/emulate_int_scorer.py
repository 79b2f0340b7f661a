"""Emulates MmaScorer's integer path (fragment assembly of cuda/src/select_blocks.cu and the PTX
m16n8k32 u8.s8 fragment layout) for one m-tile and checks the logits' integer dots exactly."""
import numpy as np

def digit(y, plane, planes):
    """select_blocks.cu's digit(): byte `plane` of y = x + kDigitOffset, top bit flipped below the top."""
    return ((y >> (8 * plane)) & 0xFF) ^ (0x80 if plane < planes - 1 else 0)

def run(D, bits, G, signed=False, seed=0):
    rng = np.random.default_rng(seed)
    kNT = 2 if G <= 4 else 4
    planes = 4 if kNT == 2 else 2
    xbits = 8 * planes - 2
    R = 1 if signed else 2
    vec_bytes = D * bits // 8
    tb = 16 if vec_bytes >= 64 else 8
    words = tb // 4
    chunks = vec_bytes // (4 * tb)
    spc = words if bits == 4 else words // 2
    spv = D // 32
    assert chunks * spc == spv
    levels = 1 << bits
    codes = rng.integers(0, levels, size=(16, R, D))  # stored (signed: two's complement bits)
    val = codes - (levels // 2 if signed else 0) if signed else codes
    if signed:
        val = np.where(codes >= levels // 2, codes - levels, codes)
    # stored bytes per row / vector
    mem = np.zeros((16, R, vec_bytes), dtype=np.uint8)
    for c in range(D):
        if bits == 4:
            mem[:, :, c // 2] |= (codes[:, :, c] << (4 * (c & 1))).astype(np.uint8)
        else:
            mem[:, :, c] = codes[:, :, c]
    x = rng.integers(-(1 << xbits) + 1, 1 << xbits, size=(G, R, D))
    def step_channels(cb, j):
        if bits == 4:
            return [cb + 8 * j + 2 * (i & 3) + (i >> 2) for i in range(8)]
        return [cb + 8 * j + i for i in range(8)]
    chunk_channel = lambda c, tq: (c * 4 + tq) * tb * 8 // bits
    flip = (0x88888888 if bits == 4 else 0x80808080) if signed else 0
    ntiles = (planes * G + 7) // 8
    acc = np.zeros((32, kNT, 4), dtype=np.int64)
    for r in range(R):
        for c in range(chunks):
            # per lane: words of rows gid, gid+8
            for j in range(spc):
                A = np.zeros((16, 32), dtype=np.int64)
                for lane in range(32):
                    g, tq = lane >> 2, lane & 3
                    off = (c * 4 + tq) * tb
                    wl = [int.from_bytes(mem[g, r, off + 4 * w: off + 4 * w + 4].tobytes(), "little") for w in range(words)]
                    wh = [int.from_bytes(mem[g + 8, r, off + 4 * w: off + 4 * w + 4].tobytes(), "little") for w in range(words)]
                    if bits == 4:
                        lo, hi = wl[j] ^ flip, wh[j] ^ flip
                        fr = [lo & 0x0F0F0F0F, hi & 0x0F0F0F0F, (lo >> 4) & 0x0F0F0F0F, (hi >> 4) & 0x0F0F0F0F]
                    else:
                        fr = [wl[2 * j] ^ flip, wh[2 * j] ^ flip, wl[2 * j + 1] ^ flip, wh[2 * j + 1] ^ flip]
                    for i in range(4):
                        A[g][4 * tq + i] = (fr[0] >> (8 * i)) & 0xFF
                        A[g + 8][4 * tq + i] = (fr[1] >> (8 * i)) & 0xFF
                        A[g][16 + 4 * tq + i] = (fr[2] >> (8 * i)) & 0xFF
                        A[g + 8][16 + 4 * tq + i] = (fr[3] >> (8 * i)) & 0xFF
                for nt in range(kNT):
                    if not (kNT <= 2 or nt < ntiles):
                        continue
                    B = np.zeros((32, 8), dtype=np.int64)
                    for lane in range(32):
                        gn, tq = lane >> 2, lane & 3
                        col = nt * 8 + gn
                        head, plane = col // planes, col % planes
                        ch = step_channels(chunk_channel(c, tq), j)
                        for e in range(8):
                            offset = 0x808080 if planes == 4 else 0x80
                            v = digit(int(x[head, r, ch[e]]) + offset, plane, planes) if head < G else 0
                            v = v - 256 if v >= 128 else v
                            B[(16 if e >= 4 else 0) + 4 * tq + (e & 3)][gn] = v
                    Dm = A @ B
                    for lane in range(32):
                        g, tq = lane >> 2, lane & 3
                        acc[lane, nt] += [Dm[g][2 * tq], Dm[g][2 * tq + 1], Dm[g + 8][2 * tq], Dm[g + 8][2 * tq + 1]]
    assert np.abs(acc).max() < 2 ** 31
    bias = (8 if bits == 4 else 128) if signed else 0
    xsum = x[:, 0, :].sum(-1)
    errors = 0
    for lane in range(32):
        g, tq = lane >> 2, lane & 3
        for half in range(2):
            row = g + 8 * half
            for nt in range(kNT):
                if kNT > 2 and nt >= ntiles:
                    continue
                c0, c1 = int(acc[lane, nt, 2 * half]), int(acc[lane, nt, 2 * half + 1])
                if planes == 4:
                    p = 2 * (tq & 1)
                    mine = (c0 << (8 * p)) + (c1 << (8 * p + 8))
                    o = lane ^ 1; po = 2 * (o & 3 & 1)
                    other = (int(acc[o, nt, 2 * half]) << (8 * po)) + (int(acc[o, nt, 2 * half + 1]) << (8 * po + 8))
                    s = mine + other; head = 2 * nt + (tq >> 1)
                else:
                    s = c0 + (c1 << 8); head = 4 * nt + tq
                if head >= G:
                    continue
                s -= bias * int(xsum[head])
                want = int((val[row] * x[head]).sum())
                errors += s != want
    return errors

if __name__ == "__main__":
    total = 0
    for D in (64, 128, 256):
        for bits in (4, 8):
            for G in (1, 3, 4, 5, 8, 16):
                for signed in (False, True):
                    e = run(D, bits, G, signed, seed=D + bits + G)
                    total += e
                    if e:
                        print("MISMATCH", D, bits, G, signed, e)
    print("errors", total)
