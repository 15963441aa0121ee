package cli

import "github.com/spf13/cobra"

// cfsCommands are the I/O aggregation verbs (expose, services...).
func cfsCommands() []*cobra.Command { return nil }
