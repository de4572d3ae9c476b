"""The node plan: every packet decision of SEMANTICS.md, made once from the inputs
(``resolve``), free of any rule syntax; ``explain`` reads it."""
