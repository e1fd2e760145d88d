"""Sandboxed WebAssembly plugins, run with Extism.

A WebAssembly plugin is a `.wasm` module plus a manifest
(`dataflare-plugin.yaml`). The `wasm` transformation loads it, checks what
the module imports against the permissions the manifest requests, and calls
it once per record batch with the batch encoded as in
`docs/plugin-batch-encoding.md`. See `docs/wasm-plugins.md`.
"""
