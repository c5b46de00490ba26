"""Running over many devices and processes: the mesh and partition rules (`mesh`), each
process's share of the batch rows and the all-gathers between them (`hosts`), joining a
multi-process job (`launch`). Import the submodules; this package imports nothing (the
models import `hosts`, and `mesh` imports the models)."""
