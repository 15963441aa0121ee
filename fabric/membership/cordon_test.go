package membership_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/membership"
)

func TestParseCordonTag(t *testing.T) {
	for in, want := range map[string]bool{"1": true, "": false, "0": false, "yes": false, "1 ": false} {
		if got := membership.ParseTags(map[string]string{membership.TagCordon: in}).Cordoned; got != want {
			t.Errorf("cordon tag %q: Cordoned %v, want %v", in, got, want)
		}
	}
}

// SetTag reaches the other members by gossip, keeps the other tags, and
// an empty value removes the tag.
func TestSetTagGossiped(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	a, b := startNode(t, "a", key), startNode(t, "b", key)
	if _, err := b.Join([]string{a.LocalAddr()}); err != nil {
		t.Fatal(err)
	}
	cordoned := func(want bool) func() bool {
		return func() bool {
			for _, m := range b.Members() {
				if m.Name == "a" {
					return m.Cordoned == want && m.FabricAddr == "127.0.0.1:7947" && m.Version == "test-a"
				}
			}
			return false
		}
	}
	state := func() string { return views(a, b) }
	if err := a.SetTag(membership.TagCordon, "1"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "a cordoned as seen by b", cordoned(true), state)
	if err := a.SetTag(membership.TagCordon, ""); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 30*time.Second, "a uncordoned as seen by b", cordoned(false), state)
}
