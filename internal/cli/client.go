package cli

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/onebox-project/onebox/agent"
	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/identity"
)

// clientFor returns an API client for the agent named by --agent,
// $ONEBOX_AGENT, or the default socket.
func clientFor(cmd *cobra.Command) (*api.Client, error) {
	addr, _ := cmd.Flags().GetString("agent")
	if addr == "" {
		addr = os.Getenv("ONEBOX_AGENT")
	}
	dataDir, _ := cmd.Flags().GetString("data-dir")
	if addr == "" {
		if dataDir != "" {
			addr = "unix://" + dataDir + "/agent.sock"
		} else {
			addr = api.DefaultAgent
		}
	}
	if strings.HasPrefix(addr, "https://") {
		if dataDir == "" {
			dataDir = agent.DefaultDataDir
		}
		id, err := identity.Load(dataDir)
		if err != nil {
			return nil, fmt.Errorf("an https agent address needs this machine's member certificate: %w", err)
		}
		return api.NewClient(addr, id.ClientTLS())
	}
	c, err := api.NewClient(addr, nil)
	if err != nil {
		return nil, usageError{err}
	}
	return c, nil
}

// addOutputFlag adds -o/--output to a read command.
func addOutputFlag(c *cobra.Command) {
	c.Flags().StringP("output", "o", "table", "output format: table or json")
}

func outputFormat(cmd *cobra.Command) (string, error) {
	o, _ := cmd.Flags().GetString("output")
	switch o {
	case "table", "json":
		return o, nil
	}
	return "", usagef("unknown output format %q: use table or json", o)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func size(b uint64) string { return agent.ByteSize(b).String() }
