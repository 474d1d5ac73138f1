"""`fvd bench`: the headline comparison against the QCOW2 baseline and QEMU (top layer).

`runner` is the command; `workloads` the measured workloads; `impls` the contenders;
`qemu` QEMU measured in-process; `backup`, `convert` and `nbd` the other row groups."""
