"""Running the hospital's side: the daemon, its gate (approved apps only), warm workers,
approvals, the audit log, status and the hospital console."""
