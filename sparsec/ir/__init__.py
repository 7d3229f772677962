"""The IR: `Program` (a captured `ExportedProgram` with what passes need, a facade over its weight store, editing,
execution, snapshots, verification, copies and serialization), capture mechanics, module paths, tags."""
