"""minilora's gradient oracle: test cases, float64 references, and comparisons of a candidate
implementation with tolerances derived from its precision, the reduction lengths and the data.

    import minilora as ml
    case = ml.oracle.make_case(d_in=64, d_out=32, r=8, dtype="bf16", seed=0)
    report = ml.oracle.compare(case, my_outputs, dtype="bf16")   # my_outputs: {"y": ..., ...}
    assert report.passed, report
"""

from minilora.oracle.cases import Case, OracleInputError, make_case, reference
from minilora.oracle.files import load_case, load_outputs, save_case, save_outputs
from minilora.oracle.judge import Judge, Report, TensorVerdict, compare, required_outputs
from minilora.oracle.kinds import INPUTS, OUTPUTS

__all__ = [
           "INPUTS",
           "OUTPUTS",
           "Case",
           "Judge",
           "OracleInputError",
           "Report",
           "TensorVerdict",
           "compare",
           "load_case",
           "load_outputs",
           "make_case",
           "reference",
           "required_outputs",
           "save_case",
           "save_outputs",
]
