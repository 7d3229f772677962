"""The IR: `Program` (a captured `ExportedProgram` with what passes need), capture mechanics, module paths, tags."""
