// One spoke network per Function App region: the delegated integration subnet(s) of that region
// (Elastic Premium: one subnet for the region's plan; Flex Consumption: one subnet per app,
// delegated to Microsoft.App/environments), each spanning one address prefix, peered with the hub so the apps reach the private
// endpoints there, and linked to the private DNS zones so their names resolve privately.

param location string
param namePrefix string
param tags object = {}

@description('main.bicep integrationAddressPrefixes (each /26 or larger).')
param addressPrefixes array

@description('Which of addressPrefixes this spoke uses, one integration subnet each: the region\'s index for Elastic Premium (one plan per region), the indexes of the region\'s apps for Flex Consumption. Together they are the spoke\'s address space.')
@minLength(1)
param prefixIndexes array

var subnetPrefixes = [for j in prefixIndexes: addressPrefixes[j]]

@description('Microsoft.Web/serverFarms (Elastic Premium) or Microsoft.App/environments (Flex Consumption).')
@allowed([
  'Microsoft.Web/serverFarms'
  'Microsoft.App/environments'
])
param delegation string

@description('Name of the hub VNet (same resource group).')
param hubVnetName string

@description('Private DNS zones (same resource group) to link this spoke to.')
param privateDnsZoneNames array

@description('Give the integration subnet a NAT gateway for its internet-bound traffic (see main.bicep deployNatGateway).')
param deployNatGateway bool

var subnetNames = [for (p, k) in subnetPrefixes: length(subnetPrefixes) == 1 ? 'snet-func' : 'snet-func-${k}']

resource hub 'Microsoft.Network/virtualNetworks@2024-05-01' existing = {
  name: hubVnetName
}

resource integrationNsg 'Microsoft.Network/networkSecurityGroups@2024-05-01' = {
  name: 'nsg-${namePrefix}-func-${location}'
  location: location
  tags: tags
  properties: {
    securityRules: [
      {
        // Nothing calls into an integration subnet; app inbound goes through the App Service
        // front end (access restrictions), not this subnet.
        name: 'DenyAllInbound'
        properties: {
          priority: 4096
          direction: 'Inbound'
          access: 'Deny'
          protocol: '*'
          sourceAddressPrefix: '*'
          sourcePortRange: '*'
          destinationAddressPrefix: '*'
          destinationPortRange: '*'
        }
      }
      {
        name: 'AllowVnetHttpsOutbound'
        properties: {
          priority: 100
          direction: 'Outbound'
          access: 'Allow'
          protocol: 'Tcp'
          sourceAddressPrefix: 'VirtualNetwork'
          sourcePortRange: '*'
          destinationAddressPrefix: 'VirtualNetwork'
          destinationPortRange: '443'
        }
      }
    ]
  }
}

// vnetRouteAllEnabled sends all of the apps' outbound traffic into this subnet, including what
// has no private endpoint: Application Insights ingestion and Entra ID token requests (public
// endpoints). A NAT gateway gives that traffic a stable, explicit way out; default outbound
// access is being retired for new subnets and cannot be relied on.
resource natIp 'Microsoft.Network/publicIPAddresses@2024-05-01' = if (deployNatGateway) {
  name: 'pip-${namePrefix}-nat-${location}'
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  properties: {
    publicIPAllocationMethod: 'Static'
    publicIPAddressVersion: 'IPv4'
  }
}

resource nat 'Microsoft.Network/natGateways@2024-05-01' = if (deployNatGateway) {
  name: 'ng-${namePrefix}-func-${location}'
  location: location
  tags: tags
  sku: {
    name: 'Standard'
  }
  properties: {
    idleTimeoutInMinutes: 4
    publicIpAddresses: [
      {
        id: natIp.id
      }
    ]
  }
}

resource vnet 'Microsoft.Network/virtualNetworks@2024-05-01' = {
  name: 'vnet-${namePrefix}-func-${location}'
  location: location
  tags: tags
  properties: {
    addressSpace: {
      addressPrefixes: subnetPrefixes
    }
    subnets: [for (p, k) in subnetPrefixes: {
      name: subnetNames[k]
      properties: {
        addressPrefix: p
        networkSecurityGroup: {
          id: integrationNsg.id
        }
        natGateway: deployNatGateway ? {
          id: nat.id
        } : null
        delegations: [
          {
            name: replace(delegation, '/', '.')
            properties: {
              serviceName: delegation
            }
          }
        ]
      }
    }]
  }
}

resource spokeToHub 'Microsoft.Network/virtualNetworks/virtualNetworkPeerings@2024-05-01' = {
  parent: vnet
  name: 'to-hub'
  properties: {
    remoteVirtualNetwork: {
      id: hub.id
    }
    allowVirtualNetworkAccess: true
    allowForwardedTraffic: false
    allowGatewayTransit: false
    useRemoteGateways: false
  }
}

resource hubToSpoke 'Microsoft.Network/virtualNetworks/virtualNetworkPeerings@2024-05-01' = {
  parent: hub
  name: 'to-${vnet.name}'
  properties: {
    remoteVirtualNetwork: {
      id: vnet.id
    }
    allowVirtualNetworkAccess: true
    allowForwardedTraffic: false
    allowGatewayTransit: false
    useRemoteGateways: false
  }
}

resource zones 'Microsoft.Network/privateDnsZones@2024-06-01' existing = [for z in privateDnsZoneNames: {
  name: z
}]

resource links 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2024-06-01' = [for (z, i) in privateDnsZoneNames: {
  parent: zones[i]
  name: 'link-${vnet.name}'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: vnet.id
    }
  }
}]

output vnetId string = vnet.id
output integrationSubnetId string = '${vnet.id}/subnets/snet-func'
output integrationSubnetIds array = [for n in subnetNames: '${vnet.id}/subnets/${n}']
