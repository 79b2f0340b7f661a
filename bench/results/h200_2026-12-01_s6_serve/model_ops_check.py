# Scratch check on the GPU: CUDA model ops vs the CPU reference at Llama-3.1-8B shapes.
import torch, absparse as ab
torch.manual_seed(0)
dev = "cuda"
for dt in (torch.bfloat16, torch.float16):
    for rows in (1, 4, 16):
        x = torch.randn(rows, 4096, dtype=dt); r = torch.randn(rows, 4096, dtype=dt)
        w = torch.randn(4096, dtype=dt)
        rc, rg = r.clone(), r.to(dev)
        yc = ab.rms_norm(x, w, 1e-5, residual=rc)
        yg = ab.rms_norm(x.to(dev), w.to(dev), 1e-5, residual=rg)
        d = (yg.cpu().float() - yc.float()).abs() / yc.float().abs().clamp_min(1e-30)
        print(dt, rows, "rms residual equal", torch.equal(rg.cpu(), rc), "max rel", d.max().item(),
              "mismatches", (yg.cpu() != yc).sum().item())
        gu = torch.randn(rows, 2 * 14336, dtype=dt)
        sc, sg = ab.silu_mul(gu), ab.silu_mul(gu.to(dev)).cpu()
        print(dt, rows, "silu mismatches", (sc != sg).sum().item(),
              "max abs", (sc.float() - sg.float()).abs().max().item())
        B, hq, hk, D, P = rows, 32, 8, 128, 64
        qkv = torch.randn(B, (hq + 2 * hk) * D, dtype=dt)
        cos, sin = torch.randn(4096, D, dtype=dt), torch.randn(4096, D, dtype=dt)
        kc = torch.randn(B * 64, P, hk, D, dtype=dt); vc = torch.randn_like(kc)
        pt = torch.randperm(B * 64, dtype=torch.int32).view(B, 64)
        pos = torch.randint(0, 4096, (B,), dtype=torch.int32)
        kg, vg = kc.to(dev), vc.to(dev)
        qc = ab.rope_append(qkv, cos, sin, kc, vc, pt, pos, hq)
        qg = ab.rope_append(qkv.to(dev), cos.to(dev), sin.to(dev), kg, vg, pt.to(dev), pos.to(dev), hq)
        print(dt, rows, "rope q equal", torch.equal(qg.cpu(), qc), "k equal", torch.equal(kg.cpu(), kc),
              "v equal", torch.equal(vg.cpu(), vc))
