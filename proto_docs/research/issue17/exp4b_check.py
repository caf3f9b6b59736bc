"""What partition value did add_files give a file lacking the identity-partition column?"""
from pyiceberg.catalog.sql import SqlCatalog
cat = SqlCatalog("ibstream", uri="sqlite:////tmp/issue17/ice_local/catalog.sqlite", warehouse="file:///tmp/issue17/ice_local/warehouse")
t = cat.load_table("ticks.bid_ask")
for task in t.scan().plan_files(): print(task.file.partition, task.file.file_path[-50:], task.file.record_count)
print(t.scan().to_arrow().group_by("contract_id").aggregate([("ts", "count")]))
