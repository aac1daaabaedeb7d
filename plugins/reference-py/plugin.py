"""The reference page's routine classes (docs/reference/fan-out.rst), as the page writes them.

Pasted unchanged from the page's three examples; only the import lines were adjusted (a
plugin imports ``Routine`` and the policy helpers; ``Flow``, ``Runtime`` and ``FlowRegistry``
become the flow files in ``examples/python/``), and one typo of the page was fixed: its
``SMSSubscriber`` reads ``slot_list``, which is not defined, where it means ``slot_data``.
The system tests check that this file is exactly that.
"""


from routilux import Routine
from routilux.activation_policies import immediate_policy
import time

# Source routine
class DataBroadcaster(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("trigger")
        self.add_event("news", ["headline", "timestamp"])

        def broadcast(slot_data, policy_message, worker_state):
            headlines = [
                "Breaking: Python 4.0 Released!",
                "News: Routilux Documentation Complete",
                "Update: Async Support Improved"
            ]
            for headline in headlines:
                import datetime
                timestamp = datetime.datetime.now().isoformat()
                print(f"Broadcasting: {headline}")
                self.emit("news", headline=headline, timestamp=timestamp)
                time.sleep(0.1)  # Simulate delay

        self.set_logic(broadcast)
        self.set_activation_policy(immediate_policy())

# Multiple subscriber routines
class EmailSubscriber(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("news")
        self.set_config(subscriber_name="Email Service")

        def process_news(slot_data, policy_message, worker_state):
            data_list = slot_data.get("news", [])
            if data_list:
                item = data_list[0]
                name = self.get_config("subscriber_name")
                print(f"  [{name}] Would send email: {item['headline']}")

        self.set_logic(process_news)
        self.set_activation_policy(immediate_policy())

class SMSSubscriber(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("news")
        self.set_config(subscriber_name="SMS Service")

        def process_news(slot_data, policy_message, worker_state):
            data_list = slot_data.get("news", [])
            if data_list:
                item = data_list[0]
                name = self.get_config("subscriber_name")
                print(f"  [{name}] Would send SMS: {item['headline'][:50]}...")

        self.set_logic(process_news)
        self.set_activation_policy(immediate_policy())

class LogSubscriber(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("news")
        self.set_config(subscriber_name="Log Service")

        def process_news(slot_data, policy_message, worker_state):
            data_list = slot_data.get("news", [])
            if data_list:
                item = data_list[0]
                name = self.get_config("subscriber_name")
                print(f"  [{name}] Logged: {item['timestamp']} - {item['headline']}")

        self.set_logic(process_news)
        self.set_activation_policy(immediate_policy())



# Input data
class DataProducer(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("trigger")
        self.add_event("image", ["id", "data"])

        def produce(slot_data, policy_message, worker_state):
            # Simulate producing image data
            for i in range(3):
                print(f"Producer: Sending image {i}")
                self.emit("image", id=i, data=f"image_{i}_bytes")
                time.sleep(0.1)

        self.set_logic(produce)
        self.set_activation_policy(immediate_policy())

# Parallel processors
class ResizeProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("image")
        self.add_event("resized", ["id", "size"])

        def process(slot_data, policy_message, worker_state):
            data_list = slot_data.get("image", [])
            if data_list:
                img = data_list[0]
                img_id = img["id"]
                # Simulate processing time
                time.sleep(0.2)
                print(f"  [Resize] Processed image {img_id}")
                self.emit("resized", id=img_id, size="800x600")

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())

class FilterProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("image")
        self.add_event("filtered", ["id", "filter"])

        def process(slot_data, policy_message, worker_state):
            data_list = slot_data.get("image", [])
            if data_list:
                img = data_list[0]
                img_id = img["id"]
                # Different processing time
                time.sleep(0.15)
                print(f"  [Filter] Processed image {img_id}")
                self.emit("filtered", id=img_id, filter="grayscale")

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())

class CompressProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("image")
        self.add_event("compressed", ["id", "ratio"])

        def process(slot_data, policy_message, worker_state):
            data_list = slot_data.get("image", [])
            if data_list:
                img = data_list[0]
                img_id = img["id"]
                # Different processing time
                time.sleep(0.25)
                print(f"  [Compress] Processed image {img_id}")
                self.emit("compressed", id=img_id, ratio="0.8")

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())


class DataRouter(Routine):
    """Routes data to different processors based on type."""

    def __init__(self):
        super().__init__()
        self.add_slot("input")
        self.add_event("high_priority", ["data"])
        self.add_event("normal_priority", ["data"])
        self.add_event("low_priority", ["data"])

        def route(slot_data, policy_message, worker_state):
            data_list = slot_data.get("input", [])
            if data_list:
                item = data_list[0]
                priority = item.get("priority", 0)

                # Emit to different events based on priority
                if priority >= 8:
                    print(f"Router: High priority → {item}")
                    self.emit("high_priority", data=item)
                elif priority >= 5:
                    print(f"Router: Normal priority → {item}")
                    self.emit("normal_priority", data=item)
                else:
                    print(f"Router: Low priority → {item}")
                    self.emit("low_priority", data=item)

        self.set_logic(route)
        self.set_activation_policy(immediate_policy())

class PriorityProcessor(Routine):
    def __init__(self):
        super().__init__()
        self.add_slot("data")
        self.set_config(level="")

        def process(slot_data, policy_message, worker_state):
            data_list = slot_data.get("data", [])
            if data_list:
                item = data_list[0]
                level = self.get_config("level")
                print(f"  [{level}] Processing: {item}")

        self.set_logic(process)
        self.set_activation_policy(immediate_policy())
