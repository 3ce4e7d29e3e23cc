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
"""
import triton
import triton.language as tl


@triton.jit
def _attend(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start, end, qk_scale, offs_n, offs_d, head_dim,
            BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over keys start .. end-1: returns the updated (acc, m_i, l_i)."""
    d_ok = offs_d < head_dim
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        kt = tl.load(k_base + n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                 # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale                   # (BLOCK_M, BLOCK_N), log2 units
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)                                              # rescales the old state
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)                 # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def fine_coarse_fwd(
    Q, K, V, KC, VC, Out,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    scb, sch, scn, scd, sob, soh, son, sod,
    heads, L, P, frames, head_dim, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """grid = (F · cdiv(L, BLOCK_M), B · heads). Q, K, V, Out: (B, h, F·L, d) with any strides;
    KC, VC: (B, h, F·P, d) pooled keys/values sharing strides (scb, sch, scn, scd);
    qk_scale = softmax scale · log2(e)."""
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
    m_ok = offs_m < L
    d_ok = offs_d < head_dim

    rows = f * L + offs_m                                                          # token index in F·L
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqn + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                      # (BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # 1. fine: every token of the own frame f (the first block always holds a valid key)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, K + b * skb + h * skh + f * L * skn, V + b * svb + h * svh + f * L * svn,
                            skn, skd, svn, svd, 0, L, qk_scale, offs_n, offs_d, head_dim, BLOCK_N, PRECISION)
    # 2./3. coarse: pooled tokens of the frames before f, then after f (own frame skipped)
    kc = KC + b * scb + h * sch
    vc = VC + b * scb + h * sch
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kc, vc, scn, scd, scn, scd,
                            0, f * P, qk_scale, offs_n, offs_d, head_dim, BLOCK_N, PRECISION)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, kc, vc, scn, scd, scn, scd,
                            (f + 1) * P, frames * P, qk_scale, offs_n, offs_d, head_dim, BLOCK_N, PRECISION)

    out = acc / l_i[:, None]
    tl.store(Out + b * sob + h * soh + rows[:, None] * son + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
