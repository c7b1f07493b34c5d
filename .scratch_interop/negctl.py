# Negative controls with warm kernels: the same scenarios as the ordering tests, minus the handshake.
import os, time
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import numpy as np, cupy, torch, jax, jax.numpy as jnp
SPIN = 200_000_000
k = cupy.RawKernel(r'''
extern "C" __global__ void spin_then_fill(float* out, long long n, long long cycles, float value) {
    long long start = clock64(); while (clock64() - start < cycles) { }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) out[i] = value;
}''', "spin_then_fill")
ours = cupy.cuda.Stream(non_blocking=True)
# warm-ups
w = cupy.zeros(1 << 20, cupy.float32); w.copy(); float(w.max())
with ours: w.copy()
k((64,), (256,), (w, np.int64(w.size), np.int64(10), np.float32(1)))
torch.zeros(4, device="cuda").fill_(1); torch.cuda._sleep(10)
dev = jax.devices("gpu")[0]
float(jnp.sum(jax.device_put(jnp.zeros(1 << 20, jnp.float32), dev)))
@jax.jit
def chain(a):
    return jax.lax.fori_loop(0, 400, lambda i, y: y @ a, a)
A = jax.device_put(jnp.full((4096, 4096), 1.0 / 4096, jnp.float32), dev)
chain(A).block_until_ready()
cupy.cuda.runtime.deviceSynchronize(); torch.cuda.synchronize()
t = time.perf_counter(); chain(A).block_until_ready(); print("jax chain seconds", time.perf_counter() - t)

# (a) torch import without our stream current during from_dlpack
side = torch.cuda.Stream()
with torch.cuda.stream(side):
    x = torch.zeros(1 << 20, device="cuda"); torch.cuda._sleep(SPIN); x.fill_(5.0)
    a = cupy.from_dlpack(x)
with ours:
    c = a.copy()
ours.synchronize(); print("(a) torch import, no handshake: max", float(c.max()))
torch.cuda.synchronize()

# (b) export to torch outside our stream
out = cupy.zeros(1 << 20, cupy.float32); cupy.cuda.runtime.deviceSynchronize()
with ours:
    k((64,), (256,), (out, np.int64(out.size), np.int64(SPIN), np.float32(7)))
r = torch.from_dlpack(out).clone(); torch.cuda.synchronize()
print("(b) torch export, no handshake: max", float(r.max()))
cupy.cuda.runtime.deviceSynchronize()

# (c) export to jax outside our stream
out = cupy.zeros(1 << 20, cupy.float32); cupy.cuda.runtime.deviceSynchronize()
with ours:
    k((64,), (256,), (out, np.int64(out.size), np.int64(SPIN), np.float32(9)))
print("(c) jax export, no handshake: sum", float(jnp.sum(jax.dlpack.from_dlpack(out))), "of", 9.0 * (1 << 20))
cupy.cuda.runtime.deviceSynchronize()

# (d) jax import without our stream
y = chain(A)
a = cupy.from_dlpack(y)
with ours:
    c = a.copy()
ours.synchronize()
print("(d) jax import, no handshake: equal", np.allclose(c.get(), np.asarray(y), rtol=1e-5))

# (d') jax import with our stream current (the library's way)
y = chain(A)
with ours:
    a = cupy.from_dlpack(y)
    c = a.copy()
ours.synchronize()
print("(d') jax import, handshake: equal", np.allclose(c.get(), np.asarray(y), rtol=1e-5))
