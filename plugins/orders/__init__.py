"""Plugins of the orders example flow, which replays retail invoices, reserves stock and bills.

`FileReplay` (replay.py) turns the rows of the UCI Online Retail data set into one event per
invoice. `Inventory` and `Restock` (inventory.py) keep stock in SQLite. `Billing` (billing.py)
charges orders through the simulated `PaymentGateway` (gateway.py). `OrderStatus` (status.py)
records each invoice's latest state in SQLite. The flows that wire them are in flows/.
"""
