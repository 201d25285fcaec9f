package tasks_test

import (
	"fmt"
	"time"

	"github.com/vaultfleet/vaultfleet/tasks"
)

// Another service asks for a validation after a consumer entered new
// credentials (revision 7): the task goes to the critical queue, and a second
// enqueue for the same revision is refused by asynq as a duplicate.
func ExampleNewValidateTask() {
	task, err := tasks.NewValidateTask("consumer-42", "crm+salesforce", tasks.ReasonCredentialsChanged, "rev7")
	if err != nil {
		panic(err)
	}
	fmt.Println(task.Type())
	fmt.Println(string(task.Payload()))
	// With an asynq client of its own:
	//   info, err := client.Enqueue(task)
	//   if errors.Is(err, asynq.ErrTaskIDConflict) { /* already queued */ }
	// Output:
	// connection:validate
	// {"v":1,"consumer_id":"consumer-42","connection_id":"crm+salesforce","reason":"credentials_changed","key":"rev7"}
}

// A refresh keyed by the expiry of the token it replaces: every trigger for
// that token (scheduled, on demand, a 401 during a check) is one task.
func ExampleNewRefreshTask() {
	task, err := tasks.NewRefreshTask("consumer-42", "accounting+xero", tasks.ReasonScheduled, "1795780800")
	if err != nil {
		panic(err)
	}
	fmt.Println(task.Type())
	fmt.Println(tasks.TaskID(task.Type(), "consumer-42", "accounting+xero", "1795780800"))
	// Output:
	// connection:refresh_token
	// connection:refresh_token:consumer-42|accounting+xero:1795780800
}

func ExampleParseConnectionPayload() {
	_, err := tasks.ParseConnectionPayload([]byte(`{"v":1,"consumer_id":"c1","connection_id":"salesforce","reason":"scheduled"}`))
	fmt.Println(err)
	// Output:
	// tasks: malformed payload: connection_id must look like unified_api+service_id
}

func ExampleNewWebhookTask() {
	task, err := tasks.NewWebhookTask("1764244800000-0", "billing")
	if err != nil {
		panic(err)
	}
	fmt.Println(task.Type(), string(task.Payload()))
	fmt.Println(tasks.IdempotencyKey("1764244800000-0", "billing"))
	// Output:
	// webhook:deliver {"v":1,"event_id":"1764244800000-0","subscription":"billing"}
	// webhook:billing:1764244800000-0
}

// The relay's delivery task carries its event (no secret in it), so the
// delivery does not need the capped stream to still hold the entry.
func ExampleNewWebhookEventTask() {
	task, err := tasks.NewWebhookEventTask("1764244800000-0", "billing", tasks.WebhookEvent{
		Type: "vault.connection.invalid", ConnectionID: "crm+hubspot", ConsumerID: "c1",
		StateBefore: "callable", StateAfter: "invalid", Reason: "credentials_rejected", Version: 7,
		Time: time.Date(2025, 11, 27, 12, 0, 0, 0, time.UTC),
	})
	if err != nil {
		panic(err)
	}
	fmt.Println(string(task.Payload()))
	// Output:
	// {"v":2,"event_id":"1764244800000-0","subscription":"billing","event":{"type":"vault.connection.invalid","connection_id":"crm+hubspot","consumer_id":"c1","state_before":"callable","state_after":"invalid","reason":"credentials_rejected","version":7,"time":"2025-11-27T12:00:00Z"}}
}
