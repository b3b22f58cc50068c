"""Evaluation: the Wang/Cai localization protocol, MaxBoxAccV2, comparisons and reports (docs/design.md#evaluation).

Modules: `iou` (box overlap: numpy, plain-loop and SQL paths), `protocol` (Acc/AFP, bounded and all modes),
`maxboxacc` (Choe et al. 2020 summary), `references` (published tables), `compare` (one table across runs),
`report` (HTML + PNG per evaluation run).
"""
from pipeline.evaluation.protocol import (DEFAULT_PROTOCOLS, IOBB_THRESHOLDS, IOU_THRESHOLDS, RESULT_COLUMNS,
                                          evaluate, evaluate_warehouse, protocol_name, write_results)

__all__ = ["DEFAULT_PROTOCOLS", "IOBB_THRESHOLDS", "IOU_THRESHOLDS", "RESULT_COLUMNS", "evaluate",
           "evaluate_warehouse", "protocol_name", "write_results"]
