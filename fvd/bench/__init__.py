"""`fvd bench`: the headline comparison against the QCOW2 baseline and QEMU (top layer).

`runner` is the command; `table` the rows and targets (how to add a row: its docstring);
`cells` what each row measures; `rounds` the paired rounds within a time budget;
`stats` and `verdicts` the ratios, spreads and verdicts; `report` the terminal, markdown
and JSON reports; `plot` the picture; `progress` the progress line; `workloads` the
measured workloads; `impls` the contenders; `qemu` QEMU measured in-process; `backup`,
`convert` and `nbd` the other row groups."""
