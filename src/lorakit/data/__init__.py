"""Training data: read records, tokenize them with loss masks, and plan packed, padded batches.

    rows = read_rows("train.jsonl")
    examples, stats = tokenize_rows(rows, tokenizer, max_length=1024)
    plan = BatchPlan(examples, batch_size=8, max_length=1024, pad_id=tokenizer.pad_token_id, seed=0)
    for rows_of_indices in plan.epoch(0):
        batch = plan.collate(rows_of_indices)     # input_ids, labels, position_ids, attention_mask
"""

from lorakit.data.batches import Batch, collate_rows
from lorakit.data.formatting import IGNORE, Example, generation_prompt, row_format, tokenize_row, tokenize_rows
from lorakit.data.packing import BatchPlan
from lorakit.data.reading import Row, read_rows

__all__ = ["Row", "read_rows", "Example", "IGNORE", "row_format", "tokenize_row", "tokenize_rows",
           "generation_prompt", "Batch", "BatchPlan", "collate_rows"]
