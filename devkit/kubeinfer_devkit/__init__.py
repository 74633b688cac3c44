"""kubeinfer's development kit: the local stack (control plane, node agent), engine builders and tiny
models, the simulator and the benchmarks. It imports the product (`kubeinfer`); the product never
imports it, and the product's image does not install it (see docs/architecture.md)."""
