"""The LaDa plug-in: the learnability-aware data filter (`filter`), contrastive
reasoning distillation (`losses`) and the transfer lifecycle that joins them to any
host (`lada`). Options live in `options` (torch-free); the plug-in is registered by
name in `lada.registry` (`none` there is the plain host)."""
