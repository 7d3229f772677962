"""Custom operators sparsec's rewrites introduce (`torch.ops.sparsec.moe`)."""
