package agent

import (
	"errors"

	"github.com/onebox-project/onebox/fabric/api"

	"github.com/onebox-project/onebox/proc/stream"
)

// Memory expansion of one program (issue 3): the local pager behind
// 'onebox run --memory-expand'. Stub; the pager slice fills it in.

func (a *Agent) startMemExpand() error { return nil }

func (a *Agent) closeMemExpand() error { return nil }

// memoryExpand prepares a program started with --memory-expand: it
// returns environment entries to add (the shim, the pager socket) and a
// release func to call once the program has ended.
func (a *Agent) memoryExpand(spec stream.Spec) (env []string, release func(), err error) {
	if !spec.MemoryExpand {
		return nil, func() {}, nil
	}
	return nil, nil, errors.New("memory expansion is not available on this node yet")
}

// pagerStats returns the local pager's counters (for 'onebox mem').
func (a *Agent) pagerStats() api.PagerStats { return api.PagerStats{} }
