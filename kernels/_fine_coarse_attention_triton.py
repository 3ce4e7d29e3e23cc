"""The Triton kernel behind `fine_coarse_attention_triton` (see fine_coarse_attention.py).

Kept in its own module because it imports triton at the top (Triton's JIT and its CPU
interpreter resolve `tl` and helper kernels through module globals); the public module
imports this one only when the Triton path runs, so `import minivid` never loads triton.

One program handles BLOCK_M queries of one frame f of one (batch, head). It keeps the
flash-attention running state (row max m, row sum l, float32 accumulator) and walks
three key ranges without building their concatenation:
  1. the L fine keys of frame f (rows f·L ... f·L + L - 1 of K, V);
  2. the coarse (pooled) keys of frames 0 .. f-1 (rows 0 ... f·P - 1 of KC, VC);
  3. the coarse keys of frames f+1 .. F-1 (rows (f+1)·P ... F·P - 1).

The head dimension is held in two power-of-two pieces, columns [0, BLOCK_D) and
[BLOCK_D, BLOCK_D + BLOCK_D2) (BLOCK_D2 = 0: one piece), because `tl.dot` and `tl.arange`
take power-of-two sizes only: SD 1.4's d = 80 and 160 are 64 + 16 and 128 + 32 (no
padding) instead of 128 and 256 (37.5 % of the products on zeros), d = 40 is 32 + 16.
Q·Kᵀ is the sum of the pieces' products; P·V fills one accumulator per piece.
"""
import triton
import triton.language as tl


@triton.jit
def _attend(acc, acc2, m_i, l_i, q, q2, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start, end, qk_scale, offs_n, offs_d, offs_d2, head_dim,
            BLOCK_N: tl.constexpr, BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over keys start .. end-1: returns the updated (acc, acc2, m_i, l_i)."""
    d_ok = offs_d < head_dim
    d2_ok = offs_d2 < head_dim
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                 # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            kt2 = tl.load(k_base + n[None, :] * stride_kn + offs_d2[:, None] * stride_kd,
                          mask=n_ok[None, :] & d2_ok[:, None], other=0.0)          # (BLOCK_D2, BLOCK_N)
            s = tl.dot(q2, kt2, s, input_precision=PRECISION)
        s = s * qk_scale                                                          # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                                              # rescales the old state
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)                 # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            vb2 = tl.load(v_base + n[:, None] * stride_vn + offs_d2[None, :] * stride_vd,
                          mask=n_ok[:, None] & d2_ok[None, :], other=0.0)          # (BLOCK_N, BLOCK_D2)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(vb2.dtype), vb2, input_precision=PRECISION)
        m_i = m_new
    return acc, acc2, m_i, l_i


@triton.jit
def fine_coarse_fwd(
    Q, K, V, KC, VC, Out,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    scb, sch, scn, scd, sob, soh, son, sod,
    heads, L, P, frames, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """grid = (F · cdiv(L, BLOCK_M), B · heads). Q, K, V, Out: (B, h, F·L, d) with any strides;
    KC, VC: (B, h, F·P, d) pooled keys/values sharing strides (scb, sch, scn, scd);
    qk_scale = softmax scale · log2(e); d <= BLOCK_D + BLOCK_D2."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    blocks_per_frame = tl.cdiv(L, BLOCK_M)
    f = pid // blocks_per_frame
    m0 = (pid % blocks_per_frame) * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    D2: tl.constexpr = BLOCK_D2 if BLOCK_D2 > 0 else 16                           # shape of the unused piece
    offs_d2 = BLOCK_D + tl.arange(0, D2)
    m_ok = offs_m < L
    d_ok = offs_d < head_dim
    d2_ok = offs_d2 < head_dim

    rows = f * L + offs_m                                                          # token index in F·L
    q_rows = Q + b * sqb + h * sqh + rows[:, None] * sqn
    q = tl.load(q_rows + offs_d[None, :] * sqd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)   # (BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, D2], dtype=tl.float32)
    if BLOCK_D2 > 0:
        q2 = tl.load(q_rows + offs_d2[None, :] * sqd, mask=m_ok[:, None] & d2_ok[None, :], other=0.0)
    else:
        q2 = tl.zeros([BLOCK_M, D2], dtype=q.dtype)                                # never read
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1. fine: every token of the own frame f (the first block always holds a valid key)
    acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, q, q2,
                                  K + b * skb + h * skh + f * L * skn, V + b * svb + h * svh + f * L * svn,
                                  skn, skd, svn, svd, 0, L, qk_scale, offs_n, offs_d, offs_d2, head_dim,
                                  BLOCK_N, BLOCK_D2, PRECISION)
    # 2./3. coarse: pooled tokens of the frames before f, then after f (own frame skipped)
    kc = KC + b * scb + h * sch
    vc = VC + b * scb + h * sch
    acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, q, q2, kc, vc, scn, scd, scn, scd,
                                  0, f * P, qk_scale, offs_n, offs_d, offs_d2, head_dim, BLOCK_N, BLOCK_D2, PRECISION)
    acc, acc2, m_i, l_i = _attend(acc, acc2, m_i, l_i, q, q2, kc, vc, scn, scd, scn, scd,
                                  (f + 1) * P, frames * P, qk_scale, offs_n, offs_d, offs_d2, head_dim,
                                  BLOCK_N, BLOCK_D2, PRECISION)

    out_rows = Out + b * sob + h * soh + rows[:, None] * son
    tl.store(out_rows + offs_d[None, :] * sod, (acc / l_i[:, None]).to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    if BLOCK_D2 > 0:
        tl.store(out_rows + offs_d2[None, :] * sod, (acc2 / l_i[:, None]).to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & d2_ok[None, :])
