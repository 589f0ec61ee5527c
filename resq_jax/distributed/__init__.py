"""Jobs over several devices and processes on JAX's distributed runtime: joining a job (``job``) and the data
mesh, with the helpers that move rows between processes (``mesh``). One code path serves one device, N local
devices and M processes (docs/architecture.md, Distributed jobs)."""
